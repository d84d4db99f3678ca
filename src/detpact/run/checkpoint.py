"""Every checkpoint read and write: crash-safe saves, verified resumes and safe loads.

A bundle is a dict of tensors and plain Python values only (see ARCHITECTURE.md,
"Checkpoint bundle"), so it loads with `torch.load(..., weights_only=True)`:
nothing in a checkpoint can run code when it is read.

A run keeps `last.pt`, the checkpoint before it as `last.prev.pt`, and `best.pt`;
`manifest.json` holds their sha256s. `stage_checkpoint` and `StagedCheckpoint.commit` order its writes so that a
crash at any point leaves every checkpoint on disk either complete and recorded in
the manifest, or a temporary file; `resume_checkpoint` verifies before it loads and
falls back to `last.prev.pt` when `last.pt` is damaged.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import pickle
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from detpact.errors import DetpactError, TrainingAborted
from detpact.run.atomic import remove_quietly, replace, stale_temp_files, temp_sibling
from detpact.run.contract import RunDir, checkpoint_sums, file_entry, read_manifest, write_manifest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# torch.load(weights_only=True) can be escaped on older torch (CVE-2025-32434 < 2.6,
# CVE-2026-24747 < 2.10): refuse to read checkpoints there rather than trust it.
MIN_SAFE_TORCH = (2, 10)
CORRUPT_SUFFIX = ".corrupt"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class CheckpointRefused(DetpactError):
    """A checkpoint that would run code when loaded. Never fallen back from silently."""


def save_checkpoint(path: Path, bundle: dict[str, Any]) -> dict[str, Any]:
    """Write `bundle` atomically to `path` (one file, no manifest); returns its manifest entry."""
    tmp, entry = _write_temp(Path(path), bundle)
    replace(tmp, path)
    return entry


def commit_checkpoint(run: RunDir, bundle: dict[str, Any], *, best: bool,
                      on_write: Callable[[int], None] | None = None, epoch: int | None = None,
                      keep_epochs: int = 0) -> None:
    """Write `bundle` as checkpoints/last.pt (and as best.pt when `best`; and as the epoch
    snapshot epoch_NNNN.pt when `epoch` is given), keep the previous last.pt as
    last.prev.pt, and record every artifact's sha256 in manifest.json. Only the newest
    `keep_epochs` epoch snapshots are kept. `stage_checkpoint` then `StagedCheckpoint.commit`
    in one go; `on_write` (fault injection) is called with the bytes written so far.
    """
    staged = stage_checkpoint(run, bundle, best=best, on_write=on_write, epoch=epoch)
    try:
        staged.commit(keep_epochs)
    finally:
        staged.discard()


@dataclass
class StagedCheckpoint:
    """A checkpoint written to fsynced temporary files but not yet in place.

    Several training processes agree that every rank reached the step before rank 0
    commits it (engine/loop.py); until then nothing a resume reads has changed.
    """

    run: RunDir
    entry: dict[str, Any]  # the manifest entry of the bundle (sha256, size)
    temps: dict[Path, Path]  # final path -> its temporary file
    snapshot: Path | None  # the epoch snapshot, when one is written
    step: int | None = None  # the bundle's global step (for messages)

    def commit(self, keep_epochs: int = 0) -> None:
        """Put the checkpoint in place, in an order a crash cannot break: (2) the manifest is
        rewritten to describe the checkpoints as they will be after the renames, and lists
        the sums of the ones being replaced; (3) last.pt -> last.prev.pt, then the temporary
        files -> last.pt / best.pt / epoch_NNNN.pt; (4) the epoch snapshots past `keep_epochs`
        are deleted. A crash in (2), (3) or (4) leaves every checkpoint on disk complete with
        its sha256 in the manifest, but for snapshots already left out of it, which the
        resume deletes (`prune_epoch_snapshots`)."""
        run = self.run
        with _disk_full_aborts(run, self.step):
            # Checkpoints only change through here, so the manifest's entries for the ones
            # not rewritten still hold: reuse them rather than hash those files again.
            recorded = read_manifest(run) or {}
            known = {target: self.entry for target in self.temps}
            if run.last_ckpt.is_file():
                known[run.prev_ckpt] = recorded.get("checkpoints/last.pt") or file_entry(run.last_ckpt)
            for kept in [run.best_ckpt, *run.epoch_snapshots()]:
                name = kept.relative_to(run.root).as_posix()
                if kept not in known and kept.is_file() and name in recorded:
                    known[kept] = recorded[name]
            dropped = []
            if self.snapshot is not None and keep_epochs:
                dropped = sorted({*run.epoch_snapshots(), self.snapshot})[:-keep_epochs]
            replaced = [old["sha256"] for name, old in recorded.items() if name.startswith("checkpoints/")]
            write_manifest(run, known, replacing=replaced, dropping=dropped)
            if run.last_ckpt.is_file():
                replace(run.last_ckpt, run.prev_ckpt)
            for target, tmp in list(self.temps.items()):
                replace(tmp, target)
                del self.temps[target]
            for old in dropped:
                remove_quietly(old)

    def discard(self) -> None:
        """Remove the temporary files not committed (none after a commit)."""
        for tmp in self.temps.values():
            remove_quietly(tmp)
        self.temps.clear()


def stage_checkpoint(run: RunDir, bundle: dict[str, Any], *, best: bool,
                     on_write: Callable[[int], None] | None = None, epoch: int | None = None) -> StagedCheckpoint:
    """(1) of a checkpoint: `bundle` in fsynced temporary files beside last.pt (and best.pt,
    epoch_NNNN.pt). A crash here leaves only temporary files, removed at the next resume."""
    temps: dict[Path, Path] = {}
    step = (bundle.get("progress") or {}).get("global_step")
    try:
        with _disk_full_aborts(run, step):
            tmp_last, entry = _write_temp(run.last_ckpt, bundle, on_write)
            temps[run.last_ckpt] = tmp_last
            snapshot = run.epoch_ckpt(epoch) if epoch is not None else None
            for target in [run.best_ckpt] * best + [snapshot] * (snapshot is not None):
                with temp_sibling(target) as (handle, tmp), tmp_last.open("rb") as source:
                    temps[target] = tmp
                    shutil.copyfileobj(source, handle, 1 << 20)
    except BaseException:
        for tmp in temps.values():
            remove_quietly(tmp)
        raise
    return StagedCheckpoint(run, entry, temps, snapshot, step)


@contextmanager
def _disk_full_aborts(run: RunDir, step: int | None) -> Iterator[None]:
    """A full disk ends training as TrainingAborted (resumable), any other error as itself."""
    try:
        yield
    except Exception as exc:
        full = _disk_full_error(exc)
        if full is not None:
            of_step = f" of step {step}" if step is not None else ""
            raise TrainingAborted(
                f"The disk is full while writing the checkpoint{of_step}: {run.last_ckpt} failed ({full.strerror}). "
                "The previous checkpoints are intact. Free some space, then continue with --resume.",
                reason="disk_full"
            ) from exc
        raise


def resume_checkpoint(run: RunDir, keep_epochs: int = 0) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of `run` that is intact, verified against manifest.json.

    Removes temporary files left by an interrupted write. When last.pt is missing, fails
    its checksum or cannot be read, says so and takes last.prev.pt instead (renamed to
    last.pt, so the rotation goes on). Any checkpoint that fails its checksum is kept
    aside as NAME.corrupt and never loaded. A checkpoint that would run code when loaded
    is refused outright. A rotation of epoch snapshots that a crash interrupted is
    finished: only the newest `keep_epochs` stay. Returns the bundle and the file it was
    read from.
    """
    for stale in stale_temp_files(run.checkpoints):
        log.info("removing %s, left by an interrupted checkpoint write", stale)
        remove_quietly(stale)
    for old in run.epoch_snapshots()[:-keep_epochs] if keep_epochs else []:
        log.info("removing %s, rotated out by train.checkpoint.keep_epochs before the interruption", old.name)
        remove_quietly(old)
    recorded = checkpoint_sums(run)
    if not recorded:
        log.warning("%s records no checkpoint checksums: loading without verification", run.manifest)
    entries: dict[Path, dict[str, Any]] = {}  # each checkpoint is hashed once: to verify it, then for the manifest
    problems: list[str] = []
    for path in (run.last_ckpt, run.prev_ckpt):
        try:
            bundle = _load_verified(path, recorded, entries)
        except CheckpointRefused:
            raise
        except DetpactError as exc:
            problems.append(exc.message)
            continue
        if path != run.last_ckpt:
            log.warning("%s Resuming from %s (step %d) instead.", problems[0], path, bundle["progress"]["global_step"])
            _set_aside(run.last_ckpt)
            replace(path, run.last_ckpt)
            entries[run.last_ckpt] = entries.pop(path)
        for other in (run.prev_ckpt, run.best_ckpt, *run.epoch_snapshots()):
            if other.is_file() and not _is_recorded(other, recorded, entries):
                log.warning("%s fails its checksum (damaged or altered after it was written).", other)
                _set_aside(other)
        # The checkpoints as they are now, each one verified.
        write_manifest(run, {p: entry for p, entry in entries.items() if p.is_file()})
        return bundle, path
    raise DetpactError(
        "Cannot resume: no usable checkpoint.\n" + "\n".join(f"  - {p}" for p in problems)
        + f"\nRestore {run.checkpoints} from a copy, or start a new run (another --run-id)."
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a detpact checkpoint with weights_only=True; user-facing errors on failure."""
    path = Path(path)
    if not path.is_file():
        raise DetpactError(f"Checkpoint not found: {path}.")
    check_torch_version(torch.__version__)
    corrupt = f"Checkpoint {path} is corrupt or truncated ({{}}). Restore it from a copy, or start a new run."
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise DetpactError(corrupt.format("not a complete torch zip archive"))
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = unsafe_globals(path)
        if unsafe:
            raise CheckpointRefused(
                f"Checkpoint {path} was refused: it holds objects other than tensors and plain values "
                f"({', '.join(unsafe[:5])}), which could run code when loaded. Only load checkpoints "
                "written by detpact or exported as plain state dicts."
            ) from None
        raise DetpactError(corrupt.format(first_line(exc))) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DetpactError(corrupt.format(first_line(exc))) from None
    if not isinstance(bundle, dict) or "format_version" not in bundle:
        raise DetpactError(f"{path} is not a detpact checkpoint (no format_version). Pass a checkpoint from a detpact run.")
    if bundle["format_version"] > FORMAT_VERSION:
        raise DetpactError(
            f"{path} has checkpoint format {bundle['format_version']}, newer than this detpact "
            f"reads ({FORMAT_VERSION}). Upgrade detpact."
        )
    return bundle


def inference_state_dict(bundle: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to evaluate, export and predict with: the EMA's when training kept one,
    unless its config says to evaluate the raw weights (train.ema.eval: false)."""
    ema = bundle.get("ema")
    use_ema = (bundle.get("config") or {}).get("train", {}).get("ema", {}).get("eval", True)
    return ema["module"] if ema and use_ema else bundle["model"]


def _disk_full_error(exc: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind `exc`, if any (torch.save reports a failed write as
    a RuntimeError raised while the OSError is being handled)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _set_aside(path: Path) -> None:
    """Keep a damaged checkpoint as NAME.corrupt (nothing written is deleted)."""
    if path.is_file():
        aside = path.with_name(path.name + CORRUPT_SUFFIX)
        replace(path, aside)
        log.warning("kept the damaged %s as %s", path.name, aside.name)


def _is_recorded(path: Path, recorded: set[str], entries: dict[Path, dict[str, Any]]) -> bool:
    """Whether the sha256 of `path` is one the manifest vouches for (True when it vouches
    for none); the file's entry is kept in `entries`."""
    entries[path] = file_entry(path)
    return not recorded or entries[path]["sha256"] in recorded


def _load_verified(path: Path, recorded: set[str], entries: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """Load `path` if its sha256 is one the manifest records for a checkpoint (checked
    before anything is deserialized); with no recorded sums, load it unverified."""
    if not path.is_file():
        raise DetpactError(f"{path} is missing.")
    if not _is_recorded(path, recorded, entries):
        raise DetpactError(f"{path} fails its checksum (sha256 {entries[path]['sha256'][:12]}... is not in "
                           "manifest.json): it was damaged or altered after it was written.")
    return load_checkpoint(path)


class _DigestWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, handle: IO[bytes], on_write: Callable[[int], None] | None):
        self._handle = handle
        self._on_write = on_write
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        written = self._handle.write(data)
        self.digest.update(memoryview(data)[:written])
        self.size += written
        if self._on_write is not None:
            self._on_write(self.size)
        return written

    def flush(self) -> None:
        self._handle.flush()


def _write_temp(path: Path, bundle: dict[str, Any], on_write: Callable[[int], None] | None = None
                ) -> tuple[Path, dict[str, Any]]:
    """Serialize `bundle` into a fsynced temporary sibling of `path`; returns it and its entry."""
    with temp_sibling(path) as (handle, tmp):
        writer = _DigestWriter(handle, on_write)
        torch.save(bundle, writer)
    return tmp, {"sha256": writer.digest.hexdigest(), "size": writer.size}


def check_torch_version(version: str) -> None:
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if release < MIN_SAFE_TORCH:
        raise DetpactError(
            f"torch {version} cannot load checkpoints safely (weights_only loading has known escapes "
            f"before {'.'.join(map(str, MIN_SAFE_TORCH))}: CVE-2025-32434, CVE-2026-24747). Upgrade torch."
        )


def unsafe_globals(path: Path) -> list[str]:
    """Globals a checkpoint's pickle would import, found without running it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an unreadable archive has no list to give: it is simply corrupt
        return []


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
