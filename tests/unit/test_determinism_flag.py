"""run.deterministic turns on torch's deterministic kernels without loading inductor (whose
import costs about a second of every command's start-up)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, torch
from detpact.engine.runtime import setup_determinism
assert not torch.are_deterministic_algorithms_enabled()
setup_determinism(0, True, 1)
assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
print("inductor loaded" if "torch._inductor" in sys.modules else "inductor not loaded")
"""


def test_deterministic_kernels_are_on_and_inductor_is_not_imported():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "inductor not loaded"
