"""Atomic file writes: a reader sees the old file or the complete new one, never a mix.

Write to a temporary file in the same folder, flush, fsync, rename over the
target, then fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"
# mkstemp creates files readable by their owner only; artifacts get the usual
# permissions (0666 minus the umask), like any file the user writes.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`.

    If the body raises, the temporary file is removed and `path` is untouched.
    """
    with temp_sibling(path, mode) as (handle, tmp):
        yield handle
    try:
        replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def temp_sibling(path: Path, mode: str = "wb") -> Iterator[tuple[IO, Path]]:
    """A temporary file `.NAME.*.tmp` next to `path`, flushed and fsynced when the block
    ends; removed if the block raises. The caller renames it into place with `replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as handle:
            yield handle, Path(tmp_name)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        remove_quietly(Path(tmp_name))
        raise


def replace(src: Path, dst: Path) -> None:
    """Rename `src` over `dst` and fsync the folder, so the rename survives a power cut."""
    os.replace(src, dst)
    _fsync_dir(Path(dst).parent)


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files that an interrupted write (e.g. kill -9) left in `folder`."""
    return sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable (e.g. a torn file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
