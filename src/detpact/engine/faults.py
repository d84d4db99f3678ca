"""Fault injection for tests: crash, stop or poison a run at a chosen moment.

Set through the environment variable DETPACT_FAULT (read once, at the entry layer),
as a comma-separated list of:
  kill@step=N             SIGKILL right after optimizer step N (and its checkpoint, if any)
  kill@step=N:micro=M     SIGKILL inside step N, after micro-batch M of its accumulation
                          group (backward done, optimizer not stepped)
  kill@save=N[:bytes=B]   SIGKILL while the checkpoint of step N is being written, after
                          B bytes of it (default 1024)
  term@step=N             send this process SIGTERM right after step N (graceful stop)
  nan@step=N[..M]         make the loss NaN at steps N..M
  oom@step=N[..M]         raise an out-of-memory error in the forward pass at steps N..M
Any entry may end in `@rank=R`: under torchrun only rank R acts on it (e.g.
nan@step=3@rank=1 poisons the loss of one process).
Steps are 1-based, as logged. Tests use these to check resume after a crash, the
graceful stop and the non-finite guard on real runs, through real signals.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from detpact.errors import DetpactError

_PATTERNS = {
    "kill_step": re.compile(r"kill@step=(\d+)"),
    "kill_micro": re.compile(r"kill@step=(\d+):micro=(\d+)"),
    "kill_save": re.compile(r"kill@save=(\d+)(?::bytes=(\d+))?"),
    "term_step": re.compile(r"term@step=(\d+)"),
    "nan": re.compile(r"nan@step=(\d+)(?:\.\.(\d+))?"),
    "oom": re.compile(r"oom@step=(\d+)(?:\.\.(\d+))?"),
}
_DEFAULT_SAVE_BYTES = 1024
_RANK = re.compile(r"(.+)@rank=(\d+)")


@dataclass(frozen=True)
class Faults:
    kill_after_step: int | None = None
    kill_in_step: tuple[int, int] | None = None  # (step, micro-batch)
    kill_in_save: tuple[int, int] | None = None  # (step, bytes)
    term_after_step: int | None = None
    nan_steps: frozenset[int] = field(default_factory=frozenset)
    oom_steps: frozenset[int] = field(default_factory=frozenset)

    def poison_at(self, step: int) -> str | None:
        """"nan" (the loss is made NaN), "oom" (the forward runs out of memory) or None."""
        return "nan" if step in self.nan_steps else "oom" if step in self.oom_steps else None

    def after_microbatch(self, step: int, micro: int) -> None:
        if self.kill_in_step == (step, micro):
            _signal_self(signal.SIGKILL)

    def after_step(self, step: int) -> None:
        if step == self.term_after_step:
            _signal_self(signal.SIGTERM)
        if step == self.kill_after_step:
            _signal_self(signal.SIGKILL)

    def save_monitor(self, step: int) -> Callable[[int], None] | None:
        """For the checkpoint write of `step`: a callback given the bytes written so far."""
        if self.kill_in_save is None or self.kill_in_save[0] != step:
            return None
        limit = self.kill_in_save[1]

        def monitor(written: int) -> None:
            if written >= limit:
                _signal_self(signal.SIGKILL)

        return monitor


NO_FAULTS = Faults()


def parse_faults(spec: str | None, rank: int = 0) -> Faults:
    """The faults of DETPACT_FAULT that this process (`rank`) acts on."""
    if not spec:
        return NO_FAULTS
    found: dict = {"nan_steps": set(), "oom_steps": set()}
    for item in spec.split(","):
        item = item.strip()
        ranked = _RANK.fullmatch(item)
        if ranked is not None:
            item = ranked.group(1)
        kind, match = next(((k, m) for k, p in _PATTERNS.items() if (m := p.fullmatch(item))), (None, None))
        if match is None:
            raise DetpactError(
                f"Bad DETPACT_FAULT entry {item!r}: use kill@step=N, kill@step=N:micro=M, "
                "kill@save=N[:bytes=B], term@step=N, nan@step=N[..M] or oom@step=N[..M], each optionally "
                "followed by @rank=R."
            )
        if ranked is not None and int(ranked.group(2)) != rank:
            continue
        numbers = [int(g) if g is not None else None for g in match.groups()]
        if kind == "kill_step":
            found["kill_after_step"] = numbers[0]
        elif kind == "kill_micro":
            found["kill_in_step"] = (numbers[0], numbers[1])
        elif kind == "kill_save":
            found["kill_in_save"] = (numbers[0], numbers[1] or _DEFAULT_SAVE_BYTES)
        elif kind == "term_step":
            found["term_after_step"] = numbers[0]
        else:
            found[f"{kind}_steps"].update(range(numbers[0], (numbers[1] or numbers[0]) + 1))
    found["nan_steps"], found["oom_steps"] = frozenset(found["nan_steps"]), frozenset(found["oom_steps"])
    return Faults(**found)


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
