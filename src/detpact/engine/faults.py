"""Fault injection for tests: crash or poison a run at a chosen step.

Set through the environment variable DETPACT_FAULT (read once, at the entry layer),
as a comma-separated list of:
  kill@step=N        SIGKILL the process right after optimizer step N (and its checkpoint)
  nan@step=N[..M]    make the loss NaN at steps N..M (1-based, as logged)
Tests use it to check resume after a crash and the non-finite guard on real runs.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field

from detpact.errors import DetpactError

_FAULT = re.compile(r"(kill|nan)@step=(\d+)(?:\.\.(\d+))?")


@dataclass(frozen=True)
class Faults:
    kill_after_step: int | None = None
    nan_steps: frozenset[int] = field(default_factory=frozenset)

    def loss_is_poisoned(self, step: int) -> bool:
        return step in self.nan_steps

    def after_step(self, step: int) -> None:
        if step == self.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)


def parse_faults(spec: str | None) -> Faults:
    if not spec:
        return Faults()
    kill, nan = None, set()
    for item in spec.split(","):
        match = _FAULT.fullmatch(item.strip())
        if not match:
            raise DetpactError(f"Bad DETPACT_FAULT entry {item!r}: use kill@step=N or nan@step=N[..M].")
        kind, first, last = match.group(1), int(match.group(2)), int(match.group(3) or match.group(2))
        if kind == "kill":
            kill = first
        else:
            nan.update(range(first, last + 1))
    return Faults(kill, frozenset(nan))
