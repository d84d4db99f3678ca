"""The run contract: every artifact path of a run, the run id rules, run_meta and manifest.

Every artifact path is computed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detpact.errors import DetpactError
from detpact.run.atomic import atomic_write_json, read_json

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
DEFAULT_OUTPUT_ROOT = "runs"


def validate_run_id(run_id: str) -> str:
    """A run id is one path component of [A-Za-z0-9._-], never '.' or '..'."""
    if not RUN_ID_PATTERN.fullmatch(run_id or "") or run_id in (".", "..") or run_id.startswith("."):
        raise DetpactError(
            f"Invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only, not starting "
            "with '.' (a single folder name, no '/' or '..'), e.g. --run-id exp01."
        )
    return run_id


def default_run_id(name: str, now: datetime) -> str:
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "run"
    return f"{now.strftime('%Y%m%d_%H%M%S')}_{safe_name}"


def resolve_cache_dir(environ: Mapping[str, str]) -> Path:
    """$DETPACT_CACHE_DIR, else ~/.cache/detpact (generated data, the image cache)."""
    return Path(environ.get("DETPACT_CACHE_DIR") or Path.home() / ".cache" / "detpact")


def resolve_output_root(configured: str | None, environ: Mapping[str, str]) -> Path:
    """run.output_root, else $DETPACT_OUTPUT_DIR, else ./runs."""
    return Path(configured or environ.get("DETPACT_OUTPUT_DIR") or DEFAULT_OUTPUT_ROOT)


EVAL_REPORT = re.compile(r"eval_[A-Za-z0-9_.-]+\.json")
EPOCH_SNAPSHOT = re.compile(r"epoch_\d{4,}\.pt")
# The plots of reports/ (run/plots.py draws them), in the order report.html shows them.
PLOT_NAMES = ("loss", "lr", "grad_norm", "val_map", "pr_curves", "confusion", "val_images")


class RunDir:
    """Paths of one run's artifacts (the table in ARCHITECTURE.md)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.reports = self.root / "reports"
        self.exports = self.root / "exports"
        self.last_ckpt = self.checkpoints / "last.pt"
        self.prev_ckpt = self.checkpoints / "last.prev.pt"  # the checkpoint before last.pt, its fallback
        self.best_ckpt = self.checkpoints / "best.pt"
        # What the run leaves for the next task's continual penalties (train.continual.save_state).
        self.continual_state = self.checkpoints / "continual.pt"
        self.train_metrics = self.reports / "train_metrics.jsonl"
        self.train_metrics_csv = self.reports / "train_metrics.csv"
        self.val_metrics = self.reports / "val_metrics.jsonl"
        self.config_resolved = self.reports / "config_resolved.yaml"
        self.run_meta = self.reports / "run_meta.json"
        self.train_report_json = self.reports / "train_report.json"
        self.train_report_md = self.reports / "train_report.md"
        self.onnx_parity = self.reports / "onnx_parity.json"
        self.scenarios_report = self.reports / "scenarios.json"  # detpact test (the scenario suite)
        self.report_html = self.reports / "report.html"  # self-contained: plots inlined, no network
        self.onnx_model = self.exports / "model.onnx"
        self.onnx_meta = self.exports / "model.onnx.meta.json"
        self.manifest = self.root / "manifest.json"
        self.status = self.root / "status.json"
        # TensorBoard event files (logging.tensorboard): a live log, not in the manifest.
        self.tensorboard = self.root / "tensorboard"

    @classmethod
    def for_run_id(cls, output_root: Path, run_id: str) -> RunDir:
        return cls(Path(output_root) / validate_run_id(run_id))

    @classmethod
    def existing(cls, path: str | Path, output_root: Path | None = None) -> RunDir:
        """Open a finished or running run's folder, checking it is one. `path` is a run
        folder, or else the id of a run under `output_root` (e.g. `exp01`)."""
        run = cls(Path(path))
        if not run.root.is_dir() and output_root is not None and RUN_ID_PATTERN.fullmatch(str(path)):
            by_id = cls(Path(output_root) / str(path))
            run = by_id if by_id.root.is_dir() else run
        if not run.root.is_dir():
            raise DetpactError(f"Run folder not found: {run.root}. Pass the folder printed by 'detpact train' "
                               "(e.g. runs/exp01), or a run id under the output root.")
        if not run.config_resolved.is_file():
            raise DetpactError(
                f"{run.root} is not a detpact run folder (no {run.config_resolved.relative_to(run.root)}). "
                "Pass the folder printed by 'detpact train'."
            )
        return run

    def epoch_ckpt(self, epoch: int) -> Path:
        """The snapshot kept at the end of `epoch` (train.checkpoint.keep_epochs)."""
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def epoch_snapshots(self) -> list[Path]:
        """The epoch snapshots on disk, oldest first."""
        return sorted(p for p in self.checkpoints.glob("epoch_*.pt") if EPOCH_SNAPSHOT.fullmatch(p.name))

    def create(self) -> None:
        for folder in (self.checkpoints, self.reports, self.exports):
            folder.mkdir(parents=True, exist_ok=True)

    def artifacts(self) -> list[Path]:
        """Every contract artifact that exists now (what the manifest covers)."""
        paths = [
            self.last_ckpt, self.prev_ckpt, self.best_ckpt, self.train_metrics, self.train_metrics_csv, self.val_metrics,
            self.config_resolved,
            self.run_meta, self.train_report_json, self.train_report_md, self.onnx_parity,
            self.onnx_model, self.onnx_meta, self.continual_state, self.scenarios_report,
        ]
        paths += [*(self.plot(name) for name in PLOT_NAMES), self.report_html]
        return [p for p in paths if p.is_file()] + self.epoch_snapshots() + self.eval_reports()

    def plot(self, name: str) -> Path:
        """reports/plot_<name>.png, for a name of PLOT_NAMES."""
        if name not in PLOT_NAMES:
            raise ValueError(f"unknown plot {name!r}: one of {', '.join(PLOT_NAMES)}")
        return self.reports / f"plot_{name}.png"

    def eval_reports(self) -> list[Path]:
        """The reports of `detpact eval` on this run: reports/eval_<checkpoint or onnx>.json."""
        return sorted(p for p in self.reports.glob("eval_*.json") if EVAL_REPORT.fullmatch(p.name))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(run: RunDir, known: Mapping[Path, Mapping[str, Any]] | None = None,
                   replacing: Iterable[str] = (), dropping: Iterable[Path] = ()) -> dict[str, Any]:
    """Record sha256 and size of every artifact present in manifest.json.

    `known` gives entries ({"sha256", "size"}) that are not hashed from disk: files
    the caller has just written (and hashed while writing), or is about to rename
    into place. `replacing` lists the sha256s of checkpoints that those renames are
    about to replace, which stay valid until they are done (see `commit_checkpoint`).
    `dropping`: files about to be deleted, left out.
    """
    known = {Path(path): dict(entry) for path, entry in (known or {}).items()}
    files = {
        path.relative_to(run.root).as_posix(): known.get(path) or file_entry(path)
        for path in sorted((set(run.artifacts()) | set(known)) - set(dropping), key=lambda p: p.as_posix())
    }
    manifest: dict[str, Any] = {"updated": utc_now(), "files": files}
    if replacing:
        manifest["replacing"] = sorted(set(replacing))
    atomic_write_json(run.manifest, manifest)
    return manifest


def read_manifest(run: RunDir) -> dict[str, dict[str, Any]] | None:
    """The manifest's {relative path: {"sha256", "size"}}, or None when it is missing or unreadable."""
    manifest = read_json(run.manifest)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return files if isinstance(files, dict) else None


def checkpoint_sums(run: RunDir) -> set[str]:
    """The sha256s manifest.json vouches for as complete checkpoints (empty when it has none)."""
    manifest = read_json(run.manifest)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return set()
    sums = {entry.get("sha256") for name, entry in manifest["files"].items() if name.startswith("checkpoints/")}
    return (sums | set(manifest.get("replacing", []))) - {None}


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_info(source_dir: Path) -> dict[str, Any]:
    """Commit and dirty flag of the detpact source checkout (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None}


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("detpact", "torch", "numpy", "onnx", "onnxruntime", "faster-coco-eval"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def host_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "platform": platform.platform(), "argv": sys.argv}
