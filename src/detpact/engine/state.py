"""The training state a checkpoint holds: the run's counters, its best validation, and
the bundle written from (and restored into) the live training objects (ARCHITECTURE.md,
"Checkpoint bundle")."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from detpact.config import Config, config_hash, resolved_dict
from detpact.data.build import DatasetSplits
from detpact.data.sampler import ResumableSampler
from detpact.engine.distributed import Distributed
from detpact.engine.plan import TrainPlan
from detpact.engine.runtime import rng_state, set_rng_state
from detpact.engine.step import StepParts
from detpact.errors import DetpactError
from detpact.run.checkpoint import FORMAT_VERSION
from detpact.run.contract import RunDir, library_versions
from detpact.run.metrics import truncate_jsonl

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters that place a run in time; all of them go into every checkpoint."""

    epoch: int = 0
    global_step: int = 0  # optimizer steps done (skipped non-finite steps included)
    step_in_epoch: int = 0
    samples_seen: int = 0


@dataclass
class Best:
    """The validation that wrote best.pt (train.checkpoint.best_metric / best_mode)."""

    metric: str = "map50_95"
    mode: str = "max"
    value: float | None = None  # None: the metric was undefined (a val split without ground truth)
    step: int = -1
    epoch: int = -1
    map50_95: float | None = None  # always recorded, whatever the metric

    def improved_by(self, value: float | None) -> bool:
        """Whether a validation scoring `value` beats this one (the first always does; an
        undefined value never beats a defined one)."""
        if self.step < 0 or (self.value is None and value is not None):
            return True
        if value is None or self.value is None:
            return False
        return value > self.value if self.mode == "max" else value < self.value


def make_bundle(cfg: Config, data: DatasetSplits, run: RunDir, parts: StepParts, progress: Progress,
            sampler: ResumableSampler, best: Best, plan: TrainPlan) -> dict[str, Any]:
    """The checkpoint bundle (ARCHITECTURE.md): tensors and plain values only."""
    return {
        "format_version": FORMAT_VERSION,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        # The LR schedule is a pure function of the step: its state is the counters.
        "scheduler": {"name": cfg.train.scheduler.name},
        "scaler": parts.scaler.state_dict() if parts.scaler else None,
        "ema": parts.ema.state_dict() if parts.ema else None,
        "task_aligner": parts.balance.aligner.state_dict() if parts.balance and parts.balance.aligner else None,
        "continual": parts.penalties.state_dict() if parts.penalties is not None else None,
        "progress": asdict(progress),
        "rng": rng_state(),
        "sampler": sampler.state_at(progress.epoch, progress.step_in_epoch * plan.images_per_step),
        "nonfinite": parts.guard.state_dict(),
        # Where the metric logs ended when this was written: a resume cuts them back to here.
        "metrics": {"train_bytes": _file_size(run.train_metrics), "val_bytes": _file_size(run.val_metrics)},
        "runtime": {"num_threads": torch.get_num_threads(), "deterministic": cfg.run.deterministic,
                    "world_size": plan.world_size},
        "config": resolved_dict(cfg),
        "config_hash": config_hash(cfg),
        "dataset_fingerprint": data.fingerprint,
        "class_names": list(data.class_names),
        "best_metric": asdict(best),
        "time_budget": plan.time_budget,
        "weights": parts.weights,
        "versions": library_versions(),
    }


def restore_bundle(bundle: dict[str, Any], parts: StepParts, run: RunDir, ctx: Distributed) -> tuple[Progress, Best]:
    """Load a bundle into freshly built objects; RNG streams are restored last."""
    try:
        parts.model.load_state_dict(bundle["model"])
        parts.optimizer.load_state_dict(bundle["optimizer"])
        if parts.ema is not None and bundle.get("ema"):
            parts.ema.load_state_dict(bundle["ema"])
        if parts.scaler is not None and bundle.get("scaler"):
            parts.scaler.load_state_dict(bundle["scaler"])
        if parts.balance is not None and parts.balance.aligner is not None:
            parts.balance.aligner.load_state_dict(bundle.get("task_aligner") or {})
    except (RuntimeError, ValueError, KeyError) as exc:  # only after a resume with --allow-drift
        raise DetpactError(f"Cannot resume from {run.last_ckpt}: its training state does not fit the model and "
                           f"optimizer of the current config ({str(exc).strip().splitlines()[0]}). Resume with "
                           "the model and optimizer settings the run was started with.") from None
    if parts.penalties is not None:
        parts.penalties.load_state_dict(bundle.get("continual"))
    parts.guard.load_state_dict(bundle["nonfinite"])
    progress = Progress(**bundle["progress"])
    best = Best(**bundle["best_metric"])
    # Metric lines written after this checkpoint belong to the lost stretch of the run.
    offsets = bundle.get("metrics") or {}
    if ctx.is_main:
        truncate_jsonl(run.train_metrics, progress.global_step, offsets.get("train_bytes"))
        truncate_jsonl(run.val_metrics, progress.global_step, offsets.get("val_bytes"))
    set_rng_state(bundle["rng"])
    log.info("resumed at step %d (epoch %d)", progress.global_step, progress.epoch)
    return progress, best


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0
