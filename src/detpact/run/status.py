"""status.json: live progress for external monitors, rewritten atomically and throttled."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from detpact.run.atomic import atomic_write_json, read_json
from detpact.run.contract import utc_now


class StatusWriter:
    """`update(phase, **fields)` rewrites status.json at most every `every_s` seconds
    (always when `force` is set, e.g. on phase changes)."""

    def __init__(self, path: Path, every_s: float):
        self.path = path
        self.every_s = every_s
        self._last_write = 0.0
        self._fields: dict[str, Any] = {}

    def update(self, phase: str, force: bool = False, **fields: Any) -> None:
        self._fields.update(fields)
        now = time.monotonic()
        if not force and now - self._last_write < self.every_s:
            return
        self._last_write = now
        atomic_write_json(self.path, {"phase": phase, "updated": utc_now(), **self._fields})


def set_phase(path: Path, phase: str, **fields: Any) -> None:
    """Change the phase of an existing status.json, keeping its other fields."""
    current = read_json(path) or {}
    atomic_write_json(path, {**current, "phase": phase, "updated": utc_now(), **fields})
