"""Every checkpoint read and write: atomic saves and safe (weights_only) loads.

A bundle is a dict of tensors and plain Python values only (see ARCHITECTURE.md,
"Checkpoint bundle"), so it loads with `torch.load(..., weights_only=True)`:
nothing in a checkpoint can run code when it is read.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from detpact.errors import DetpactError
from detpact.run.atomic import atomic_open

FORMAT_VERSION = 1


def save_checkpoint(path: Path, bundle: dict[str, Any]) -> None:
    """Write `bundle` atomically: an interrupted save leaves the previous file intact."""
    with atomic_open(path, "wb") as handle:
        torch.save(bundle, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a detpact checkpoint with weights_only=True; user-facing errors on failure."""
    path = Path(path)
    if not path.is_file():
        raise DetpactError(f"Checkpoint not found: {path}.")
    corrupt = f"Checkpoint {path} is corrupt or truncated ({{}}). Restore it from a copy, or start a new run."
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise DetpactError(corrupt.format("not a complete torch zip archive"))
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise DetpactError(
                f"Checkpoint {path} was refused: it holds objects other than tensors and plain values "
                f"({', '.join(unsafe[:5])}), which could run code when loaded. Only load checkpoints "
                "written by detpact or exported as plain state dicts."
            ) from None
        raise DetpactError(corrupt.format(_first_line(exc))) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DetpactError(corrupt.format(_first_line(exc))) from None
    if not isinstance(bundle, dict) or "format_version" not in bundle:
        raise DetpactError(f"{path} is not a detpact checkpoint (no format_version). Pass a checkpoint from a detpact run.")
    if bundle["format_version"] > FORMAT_VERSION:
        raise DetpactError(
            f"{path} has checkpoint format {bundle['format_version']}, newer than this detpact "
            f"reads ({FORMAT_VERSION}). Upgrade detpact."
        )
    return bundle


def inference_state_dict(bundle: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to evaluate, export and predict with: the EMA's when training kept one."""
    ema = bundle.get("ema")
    return ema["module"] if ema else bundle["model"]


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a checkpoint's pickle would import, found without running it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an unreadable archive has no list to give: it is simply corrupt
        return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
