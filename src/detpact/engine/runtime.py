"""Runtime set-up: device, seeds, determinism, thread count and mixed precision."""

from __future__ import annotations

import contextlib
import os
import random
import sys

import numpy as np
import torch

from detpact.errors import DetpactError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DetpactError("run.device is 'cuda' but no CUDA device is available. Use run.device: auto or cpu.")
    return torch.device(name)


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "fp16" and device.type != "cuda":
        raise DetpactError("run.amp: fp16 needs a CUDA device; on CPU use run.amp: bf16 (or none).")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The one autocast context of the forward pass ('none' -> a no-op)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def setup_determinism(seed: int, deterministic: bool, num_threads: int | None) -> dict:
    """Seed python, numpy and torch, fix the intra-op thread count and, when
    `deterministic`, force deterministic kernels.

    CPU results depend on the thread count (reductions split differently), so it is
    always fixed: to `num_threads`, else to torch's default for this machine. Returns
    what was set, for run_meta.json and the checkpoints.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(num_threads or torch.get_num_threads())
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        deterministic_algorithms()
        torch.backends.cudnn.benchmark = False
    return {
        "seed": seed,
        "deterministic": deterministic,
        "num_threads": torch.get_num_threads(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def rng_state() -> dict:
    """Every global RNG stream, as plain tensors/containers (loads with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def deterministic_algorithms() -> None:
    """torch.use_deterministic_algorithms(True), without importing torch._inductor.

    The public function also sets inductor's `deterministic` option, and importing inductor
    (and dynamo with it) takes about a second, a third of a command's start-up; detpact
    compiles nothing with inductor, so only the kernel flag matters. Where torch lacks the
    private setter, or inductor is loaded anyway, the public function runs.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=False)
    else:
        setter(True, warn_only=False)
