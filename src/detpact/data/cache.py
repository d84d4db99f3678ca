"""Decoded-image cache (`data.cache`): images decoded and resized once, reused afterwards.

What is cached is `resize_long_side(open_rgb(path), size)`, the letterbox before its
padding, so cached and uncached pixels are the same bytes. Modes:

- none: decode every time;
- ram:  a dict in each process (every DataLoader worker fills its own copy; about
        size^2 x 2.3 bytes per image, e.g. 0.9 MB at 640 px);
- disk: one .npy file per (image, size) in a folder shared by workers and runs. The
        key is the image's absolute path, byte size and mtime_ns plus the resize
        target, so an edited image is decoded again. Files are written to a temporary
        name in the same folder and renamed into place: a reader never sees half a
        file, and concurrent writers of the same key simply race to an identical file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from detpact.data.formats import open_rgb
from detpact.data.transforms import resize_long_side
from detpact.run.atomic import atomic_open

log = logging.getLogger(__name__)

CacheMode = Literal["none", "ram", "disk"]
# Part of every key: bump when the cached pixels change (decoder, resize method).
CACHE_VERSION = "1-pil-bilinear"


class ImageCache:
    """`load(path, size)` -> uint8 [h, w, 3], the image resized so its longer side is `size`."""

    def __init__(self, mode: CacheMode = "none", folder: Path | None = None):
        if mode not in ("none", "ram", "disk"):
            raise ValueError(f"unknown cache mode {mode!r}: choose none, ram or disk")
        if mode == "disk" and folder is None:
            raise ValueError("the disk cache needs a folder")
        self.mode = mode
        self.folder = Path(folder) if folder is not None else None
        self._ram: dict[str, np.ndarray] = {}
        self._write_failed = False

    def load(self, path: Path, size: int) -> np.ndarray:
        if self.mode == "none":
            return _decode(path, size)
        key = cache_key(path, size)
        if self.mode == "ram":
            if key not in self._ram:
                self._ram[key] = _decode(path, size)
            return self._ram[key]
        file = self.folder / f"{key}.npy"
        pixels = _read(file, size)
        if pixels is None:
            pixels = _decode(path, size)
            self._write(file, pixels)
        return pixels

    def _write(self, file: Path, pixels: np.ndarray) -> None:
        try:
            with atomic_open(file, "wb") as out:
                np.save(out, pixels, allow_pickle=False)
        except OSError as exc:
            # A cache is an optimisation: a full or read-only disk must not stop training.
            if not self._write_failed:
                log.warning("cannot write the image cache in %s (%s); decoding images without it", file.parent, exc)
                self._write_failed = True


def cache_key(path: Path, size: int) -> str:
    """Hex digest of (absolute path, byte size, mtime_ns, resize target, cache version)."""
    path = Path(path).absolute()
    stat = path.stat()
    text = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}\0{CACHE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _decode(path: Path, size: int) -> np.ndarray:
    return resize_long_side(open_rgb(path), size)


def _read(file: Path, size: int) -> np.ndarray | None:
    """The cached pixels, or None when missing or not a valid entry (then it is rewritten)."""
    try:
        pixels = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):
        log.warning("ignoring unreadable image cache file %s", file)
        return None
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or max(pixels.shape[:2]) != size:
        log.warning("ignoring image cache file %s of unexpected shape %s", file, pixels.shape)
        return None
    return pixels
