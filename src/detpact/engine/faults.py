"""Fault injection for tests: crash, stop or poison a run at a chosen moment.

Set through the environment variable DETPACT_FAULT (read once, at the entry layer),
as a comma-separated list of:
  kill@step=N             SIGKILL right after optimizer step N (and its checkpoint, if any)
  kill@step=N:micro=M     SIGKILL inside step N, after micro-batch M of its accumulation
                          group (backward done, optimizer not stepped)
  kill@save=N[:bytes=B]   SIGKILL while the checkpoint of step N is being written, after
                          B bytes of it (default 1024)
  term@step=N             send this process SIGTERM right after step N (graceful stop)
  raise@step=N            raise an exception right after step N (a crashing process)
  sleep@save=N:seconds=S  sleep S seconds while writing the checkpoint of step N (a slow disk)
  full@save=N[:bytes=B]   the checkpoint write of step N fails with ENOSPC after B bytes
                          (default 1024): a disk filling up
  nan@step=N[..M]         make the loss NaN at steps N..M
  oom@step=N[..M]         raise an out-of-memory error in the forward pass at steps N..M
Any entry may end in `@rank=R`: under torchrun only rank R acts on it (e.g.
nan@step=3@rank=1 poisons the loss of one process).
Steps are 1-based, as logged. Faults act on a launch's first attempt only: when
torchrun restarts the worker group (TORCHELASTIC_RESTART_COUNT > 0), the restarted
processes run clean, as after a one-off failure. Tests use these to check resume after a crash, the
graceful stop and the non-finite guard on real runs, through real signals.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from detpact.errors import DetpactError

_PATTERNS = {
    "kill_step": re.compile(r"kill@step=(\d+)"),
    "kill_micro": re.compile(r"kill@step=(\d+):micro=(\d+)"),
    "kill_save": re.compile(r"kill@save=(\d+)(?::bytes=(\d+))?"),
    "term_step": re.compile(r"term@step=(\d+)"),
    "raise_step": re.compile(r"raise@step=(\d+)"),
    "sleep_save": re.compile(r"sleep@save=(\d+):seconds=(\d+(?:\.\d+)?)"),
    "full_save": re.compile(r"full@save=(\d+)(?::bytes=(\d+))?"),
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
    raise_after_step: int | None = None
    sleep_in_save: tuple[int, float] | None = None  # (step, seconds)
    full_in_save: tuple[int, int] | None = None  # (step, bytes)
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
        if step == self.raise_after_step:
            raise InjectedFault(f"DETPACT_FAULT raise@step={step}: this process fails on purpose")

    def save_monitor(self, step: int) -> Callable[[int], None] | None:
        """For the checkpoint write of `step`: a callback given the bytes written so far."""
        if self.sleep_in_save is not None and self.sleep_in_save[0] == step:
            seconds, slept = self.sleep_in_save[1], []

            def slow(written: int) -> None:
                if not slept:
                    slept.append(True)
                    time.sleep(seconds)

            return slow
        if self.full_in_save is not None and self.full_in_save[0] == step:
            room = self.full_in_save[1]

            def fill(written: int) -> None:
                if written >= room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return fill
        if self.kill_in_save is None or self.kill_in_save[0] != step:
            return None
        limit = self.kill_in_save[1]

        def monitor(written: int) -> None:
            if written >= limit:
                _signal_self(signal.SIGKILL)

        return monitor


NO_FAULTS = Faults()


class InjectedFault(RuntimeError):
    """The failure raise@step=N asks for: an ordinary crash, not a user error."""


def parse_faults(spec: str | None, rank: int = 0, attempt: int = 0) -> Faults:
    """The faults of DETPACT_FAULT that this process (`rank`, on torchrun's restart
    `attempt`) acts on: none after a restart."""
    if not spec or attempt > 0:
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
                "kill@save=N[:bytes=B], term@step=N, raise@step=N, sleep@save=N:seconds=S, full@save=N[:bytes=B], "
                "nan@step=N[..M] or oom@step=N[..M], each optionally followed by @rank=R."
            )
        if ranked is not None and int(ranked.group(2)) != rank:
            continue
        numbers = [int(g) if g is not None and g.isdigit() else None for g in match.groups()]
        if kind == "kill_step":
            found["kill_after_step"] = numbers[0]
        elif kind == "kill_micro":
            found["kill_in_step"] = (numbers[0], numbers[1])
        elif kind == "kill_save":
            found["kill_in_save"] = (numbers[0], numbers[1] or _DEFAULT_SAVE_BYTES)
        elif kind == "term_step":
            found["term_after_step"] = numbers[0]
        elif kind == "raise_step":
            found["raise_after_step"] = numbers[0]
        elif kind == "full_save":
            found["full_in_save"] = (numbers[0], numbers[1] or _DEFAULT_SAVE_BYTES)
        elif kind == "sleep_save":
            found["sleep_in_save"] = (int(match.group(1)), float(match.group(2)))
        else:
            found[f"{kind}_steps"].update(range(numbers[0], (numbers[1] or numbers[0]) + 1))
    found["nan_steps"], found["oom_steps"] = frozenset(found["nan_steps"]), frozenset(found["oom_steps"])
    return Faults(**found)


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
