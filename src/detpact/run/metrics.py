"""Append-only JSONL metric logs (one JSON object per line, each with a "step")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detpact.run.atomic import atomic_write_text


class JsonlLog:
    """Appends records to a JSONL file, flushing each line so monitors see it at once."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a crash is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only records with step <= max_step, so a resumed run never duplicates a line."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))
