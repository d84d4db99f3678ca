"""The training loop.

`fit()` reads top to bottom: build data, model and optimiser -> maybe resume ->
per epoch { train steps, evaluate, record, checkpoint }. `train_step()` is one
optimizer step: forward, loss, non-finite guard, backward, clip, step, EMA.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from detpact.config import Config, TrainConfig, config_hash, resolved_dict
from detpact.data.dataset import DatasetSplits, DetectionDataset, collate
from detpact.data.sampler import ResumableSampler
from detpact.engine.ema import ModelEMA
from detpact.engine.evaluate import evaluate, prepare_images
from detpact.engine.guards import NonFiniteGuard
from detpact.engine.optim import build_optimizer, lr_at, set_lr
from detpact.engine.progress import train_progress
from detpact.engine.runtime import autocast, rng_state, set_rng_state
from detpact.errors import DetpactError
from detpact.models.detector import build_model, count_parameters
from detpact.models.losses import DetectionCriterion, build_criterion
from detpact.run.checkpoint import FORMAT_VERSION, save_checkpoint
from detpact.run.contract import RunDir, library_versions, write_manifest
from detpact.run.metrics import JsonlLog, truncate_jsonl
from detpact.run.status import StatusWriter

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
    map50_95: float = -1.0
    step: int = -1
    epoch: int = -1


@dataclass
class StepParts:
    """What one optimizer step touches."""

    model: nn.Module
    criterion: DetectionCriterion
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None
    scaler: torch.amp.GradScaler | None
    guard: NonFiniteGuard
    device: torch.device
    amp: str
    channels_last: bool
    grad_clip: float | None
    accumulate: int


@dataclass
class FitResult:
    steps: int
    epochs_done: int
    best: Best
    last_val: dict[str, Any] | None
    loss_history: list[float] = field(default_factory=list)
    nonfinite_skipped: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0
    num_params: int = 0


def train_step(parts: StepParts, batches: Iterator, lr: float) -> dict[str, float] | None:
    """One optimizer step over `accumulate` micro-batches. Returns its metrics, or None
    when the step was skipped because the loss or the gradients were not finite."""
    set_lr(parts.optimizer, lr)
    parts.optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "loss_cls": 0.0, "loss_box": 0.0, "num_pos": 0.0}
    finite = True
    images_seen = 0
    for _ in range(parts.accumulate):
        images, targets = next(batches)
        images_seen += len(images)
        if not finite:
            continue  # still consume the group's batches so data order is unchanged
        with autocast(parts.device, parts.amp):
            outputs = parts.model(prepare_images(images, parts.device, parts.channels_last))
        losses = parts.criterion(outputs, targets)  # float32, outside autocast
        loss_value = losses["loss"].detach().item()
        if not math.isfinite(loss_value):
            finite = False
            continue
        loss = losses["loss"] / parts.accumulate
        (parts.scaler.scale(loss) if parts.scaler else loss).backward()
        for key in sums:
            sums[key] += float(losses[key].detach()) / parts.accumulate
    if finite:
        if parts.scaler:
            parts.scaler.unscale_(parts.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parts.model.parameters(), parts.grad_clip or float("inf"), foreach=True
        ).item()
        finite = math.isfinite(grad_norm)
    if parts.scaler:
        # GradScaler skips the update itself on inf/NaN gradients and lowers its scale.
        parts.scaler.step(parts.optimizer) if finite else None
        parts.scaler.update()
    elif finite:
        parts.optimizer.step()
    if not finite:
        parts.optimizer.zero_grad(set_to_none=True)
        return None
    if parts.ema is not None:
        parts.ema.update(parts.model)
    return {**sums, "grad_norm": grad_norm, "images": images_seen}


def fit(cfg: Config, run: RunDir, data: DatasetSplits, device: torch.device, resume: dict | None) -> FitResult:
    """Train per `cfg` into `run`; `resume` is the bundle of `last.pt` to continue from."""
    tcfg = cfg.train
    train_loader, val_loader, sampler = _build_loaders(cfg, data)
    steps_per_epoch = len(data.train) // (tcfg.batch_size * tcfg.accumulate)
    if steps_per_epoch == 0:
        raise DetpactError(
            f"The training split has {len(data.train)} images, fewer than train.batch_size x "
            f"train.accumulate = {tcfg.batch_size * tcfg.accumulate}. Lower train.batch_size or add images."
        )
    total_steps = min(tcfg.epochs * steps_per_epoch, tcfg.max_steps or math.inf)

    model = build_model(cfg.model, len(data.class_names)).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    parts = StepParts(
        model=model,
        criterion=build_criterion(cfg.model.head),
        optimizer=build_optimizer(model, tcfg.optimizer),
        ema=ModelEMA(model, tcfg.ema) if tcfg.ema.enabled else None,
        scaler=torch.amp.GradScaler(device.type) if cfg.run.amp == "fp16" else None,
        guard=NonFiniteGuard(tcfg.nonfinite.max_consecutive, str(run.last_ckpt)),
        device=device, amp=cfg.run.amp, channels_last=cfg.run.channels_last,
        grad_clip=tcfg.grad_clip, accumulate=tcfg.accumulate,
    )
    progress, best = Progress(), Best()
    if resume is not None:
        progress, best = _restore(resume, parts, run)
    log.info(
        "model: %.2fM parameters; %d train / %d val images; %d steps per epoch, %d steps in all",
        count_parameters(model) / 1e6, len(data.train), len(data.val), steps_per_epoch, total_steps,
    )

    def checkpoint(improved: bool) -> None:
        bundle = _bundle(cfg, data, parts, progress, sampler, best)
        save_checkpoint(run.last_ckpt, bundle)
        if improved:
            save_checkpoint(run.best_ckpt, bundle)
        write_manifest(run)

    def validate() -> tuple[dict[str, Any], bool]:
        status.update("eval", force=True, step=progress.global_step, epoch=progress.epoch)
        eval_model = parts.ema.module if parts.ema is not None else model
        metrics = evaluate(eval_model, val_loader, data.val, data.class_names, cfg.model.postprocess,
                           device, cfg.run.amp, cfg.run.channels_last)
        val_log.write({"step": progress.global_step, "epoch": progress.epoch, **metrics})
        improved = metrics["map50_95"] > best.map50_95
        if improved:
            best.map50_95, best.step, best.epoch = metrics["map50_95"], progress.global_step, progress.epoch
        log.info("step %d epoch %d: val map50_95 %.4f map50 %.4f%s", progress.global_step, progress.epoch,
                 metrics["map50_95"], metrics["map50"], " (best)" if improved else "")
        status.update("train", force=True, last_val={k: metrics[k] for k in ("map50_95", "map50", "map75")})
        return metrics, improved

    train_log, val_log = JsonlLog(run.train_metrics), JsonlLog(run.val_metrics)
    status = StatusWriter(run.status, cfg.logging.status_every_s)
    result = FitResult(steps=0, epochs_done=progress.epoch, best=best, last_val=None, num_params=count_parameters(model))
    started = time.perf_counter()
    last_val_step = -1
    try:
        with train_progress(total_steps, progress.global_step, cfg.logging.progress) as bar:
            while progress.global_step < total_steps:
                sampler.set_epoch(progress.epoch, start=progress.step_in_epoch * tcfg.batch_size * tcfg.accumulate)
                batches = iter(train_loader)
                tick = time.perf_counter()
                while progress.step_in_epoch < steps_per_epoch and progress.global_step < total_steps:
                    lr = lr_at(progress.global_step, total_steps, tcfg.optimizer.lr, tcfg.scheduler)
                    stats = train_step(parts, batches, lr)
                    parts.guard.record(stats is not None, progress.global_step + 1)
                    progress.global_step += 1
                    progress.step_in_epoch += 1
                    images = tcfg.batch_size * tcfg.accumulate
                    progress.samples_seen += images
                    now = time.perf_counter()
                    speed = images / max(now - tick, 1e-9)
                    tick = now
                    record = _step_record(progress, lr, stats, parts.guard, speed, now - started)
                    train_log.write(record)
                    if stats is not None:
                        result.loss_history.append(stats["loss"])
                    bar.update(progress.global_step, record["loss"], lr, speed, progress.epoch)
                    status.update("train", step=progress.global_step, epoch=progress.epoch, total_steps=total_steps,
                                  loss=record["loss"], eta_s=(total_steps - progress.global_step) * (now - started)
                                  / max(1, progress.global_step - (resume or {}).get("progress", {}).get("global_step", 0)))
                    if _due(tcfg.checkpoint.every_steps, progress.global_step) and progress.step_in_epoch < steps_per_epoch:
                        checkpoint(improved=False)
                epoch_done = progress.step_in_epoch >= steps_per_epoch
                if epoch_done:
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                finished = progress.global_step >= total_steps
                improved = False
                if finished or (epoch_done and _due(cfg.eval.every_epochs, progress.epoch)):
                    result.last_val, improved = validate()
                    last_val_step = progress.global_step
                if finished or improved or (epoch_done and _due(tcfg.checkpoint.every_epochs, progress.epoch)) \
                        or _due(tcfg.checkpoint.every_steps, progress.global_step):
                    checkpoint(improved)
    except BaseException:
        status.update("failed", force=True, step=progress.global_step, epoch=progress.epoch)
        raise
    finally:
        train_log.close()
        val_log.close()
    del last_val_step
    status.update("done", force=True, step=progress.global_step, epoch=progress.epoch)
    result.steps = progress.global_step
    result.epochs_done = progress.epoch
    result.nonfinite_skipped = parts.guard.skipped
    result.train_seconds = time.perf_counter() - started
    result.samples_seen = progress.samples_seen
    return result


def _build_loaders(cfg: Config, data: DatasetSplits) -> tuple[DataLoader, DataLoader, ResumableSampler]:
    dcfg = cfg.data
    train_ds = DetectionDataset(data.train, dcfg.image_size, train=True, seed=cfg.run.seed, hflip_p=dcfg.hflip_p)
    val_ds = DetectionDataset(data.val, dcfg.image_size, train=False)
    sampler = ResumableSampler(len(train_ds), cfg.run.seed)
    workers = dict(num_workers=dcfg.num_workers, persistent_workers=dcfg.num_workers > 0, collate_fn=collate)
    train_loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True, **workers)
    val_loader = DataLoader(val_ds, batch_size=cfg.eval.batch_size, shuffle=False, **workers)
    return train_loader, val_loader, sampler


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count > 0 and count % every == 0


def _step_record(progress: Progress, lr: float, stats: dict | None, guard: NonFiniteGuard,
                 speed: float, elapsed: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": progress.global_step, "epoch": progress.epoch, "lr": lr}
    if stats is None:
        record.update(loss=None, loss_cls=None, loss_box=None, num_pos=None, grad_norm=None, skipped=True)
    else:
        record.update({k: stats[k] for k in ("loss", "loss_cls", "loss_box", "num_pos", "grad_norm")}, skipped=False)
    record.update(nonfinite_skipped=guard.skipped, samples_per_s=round(speed, 2), time_s=round(elapsed, 3))
    return record


def _bundle(cfg: Config, data: DatasetSplits, parts: StepParts, progress: Progress,
            sampler: ResumableSampler, best: Best) -> dict[str, Any]:
    """The checkpoint bundle (ARCHITECTURE.md): tensors and plain values only."""
    return {
        "format_version": FORMAT_VERSION,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        # The LR schedule is a pure function of the step: its state is the counters.
        "scheduler": {"name": cfg.train.scheduler.name},
        "scaler": parts.scaler.state_dict() if parts.scaler else None,
        "ema": parts.ema.state_dict() if parts.ema else None,
        "progress": asdict(progress),
        "rng": rng_state(),
        "sampler": sampler.state_dict(),
        "nonfinite": parts.guard.state_dict(),
        "config": resolved_dict(cfg),
        "config_hash": config_hash(cfg),
        "dataset_fingerprint": data.fingerprint,
        "class_names": list(data.class_names),
        "best_metric": asdict(best),
        "versions": library_versions(),
    }


def _restore(bundle: dict[str, Any], parts: StepParts, run: RunDir) -> tuple[Progress, Best]:
    """Load a bundle into freshly built objects; RNG streams are restored last."""
    parts.model.load_state_dict(bundle["model"])
    parts.optimizer.load_state_dict(bundle["optimizer"])
    if parts.ema is not None and bundle.get("ema"):
        parts.ema.load_state_dict(bundle["ema"])
    if parts.scaler is not None and bundle.get("scaler"):
        parts.scaler.load_state_dict(bundle["scaler"])
    parts.guard.load_state_dict(bundle["nonfinite"])
    progress = Progress(**bundle["progress"])
    best = Best(**bundle["best_metric"])
    # Metric lines written after this checkpoint belong to the lost stretch of the run.
    truncate_jsonl(run.train_metrics, progress.global_step)
    truncate_jsonl(run.val_metrics, progress.global_step)
    set_rng_state(bundle["rng"])
    log.info("resumed from %s at step %d (epoch %d)", run.last_ckpt, progress.global_step, progress.epoch)
    return progress, best


def train_config_summary(tcfg: TrainConfig) -> str:
    return f"{tcfg.epochs} epochs, batch {tcfg.batch_size} x {tcfg.accumulate}, lr {tcfg.optimizer.lr:g}"
