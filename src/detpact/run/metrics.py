"""Append-only JSONL metric logs (one JSON object per line, each with a "step")."""

from __future__ import annotations

import csv
import io
import json
import os
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
    return _parse_jsonl(path.read_text(encoding="utf-8")) if path.is_file() else []


def truncate_jsonl(path: Path, max_step: int, size: int | None = None) -> None:
    """Cut a metric log back to where it was at a checkpoint, so that a resumed run
    neither duplicates nor loses a line: to `size` bytes when the checkpoint recorded
    it, then to the records with step <= max_step (which also drops a torn last line)."""
    if not path.is_file():
        return
    if size is not None and path.stat().st_size > size:
        with path.open("r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())
    text = path.read_text(encoding="utf-8")
    records = _parse_jsonl(text)
    kept = [r for r in records if r.get("step", 0) <= max_step]
    if len(kept) != len(records) or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


def write_csv_mirror(jsonl: Path, csv_path: Path) -> int:
    """Write the records of `jsonl` as CSV (a column per key, in first-seen order; a missing
    or null value is an empty cell), atomically. Returns the number of rows."""
    records = read_jsonl(jsonl)
    columns = list(dict.fromkeys(key for record in records for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    atomic_write_text(csv_path, out.getvalue())
    return len(records)


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
