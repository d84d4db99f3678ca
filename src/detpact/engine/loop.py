"""The training loop.

`fit()` reads top to bottom: build data, model and optimiser -> maybe resume ->
per epoch { train steps, evaluate, record, checkpoint }. One optimizer step is
`train_step()` (engine/step.py).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from detpact.config import Config
from detpact.data.build import DatasetSplits
from detpact.data.cache import ImageCache
from detpact.data.dataset import DetectionDataset, eval_loader, make_loader, resolve_num_workers
from detpact.data.sampler import ResumableSampler
from detpact.engine import budget as budget_module
from detpact.engine.balance import build_loss_balance
from detpact.engine.distributed import (
    SINGLE,
    Distributed,
    any_rank,
    broadcast_from_main,
    broadcast_state,
    global_normaliser,
    meet,
    sync_batchnorm,
)
from detpact.engine.early_stop import EarlyStopping
from detpact.engine.ema import ModelEMA
from detpact.engine.evaluate import evaluate
from detpact.engine.faults import NO_FAULTS, Faults
from detpact.engine.guards import NonFiniteGuard
from detpact.engine.multiscale import MultiScale
from detpact.engine.optim import build_optimizer, describe_groups, lr_at
from detpact.engine.penalties import build_penalties
from detpact.engine.penalties.handoff import save_continual_state
from detpact.engine.plan import TrainPlan, plan_training
from detpact.engine.progress import train_progress
from detpact.engine.recalibrate import EpochSampler, recalibrate_batchnorm, recalibration_indices
from detpact.engine.recorder import NullRecorder, Recorder
from detpact.engine.stages import StageSwitch
from detpact.engine.state import Best, Progress, make_bundle, restore_bundle
from detpact.engine.step import StepParts, train_step
from detpact.engine.stop import stop_on_signals
from detpact.errors import DetpactError, TrainingAborted, TrainingStopped
from detpact.models.detector import build_model, count_parameters
from detpact.models.lora import apply_lora
from detpact.models.losses import build_criterion
from detpact.models.losses.normalise import local_normaliser
from detpact.models.mim import MIMObjective
from detpact.models.quant import apply_quant
from detpact.run.checkpoint import stage_checkpoint
from detpact.run.contract import RunDir
from detpact.run.weights import apply_freeze, apply_initial_weights, carried_initial_weights
from detpact.tracking.base import NO_TRACKER, TrackerSet

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What `fit` reports back for the run's summary."""

    best: Best
    num_params: int
    start_step: int  # where this session began (non-zero after a resume)
    start_samples: int = 0  # images seen before this session
    progress: Progress = field(default_factory=Progress)
    last_val: dict[str, Any] | None = None
    nonfinite_skipped: int = 0
    skip_counts: dict[str, int] = field(default_factory=dict)  # steps skipped per cause: nan, inf, oom
    train_seconds: float = 0.0
    weights: dict[str, Any] = field(default_factory=dict)  # StepParts.weights
    optimizer_groups: list[dict[str, Any]] = field(default_factory=list)  # optim.describe_groups
    # steps_done, early_stop, time_budget; or, on the exception fit raises (its `fit_result`):
    # signal, nonfinite_abort, disk_full, aborted
    end_reason: str = "steps_done"
    plan: TrainPlan | None = None


def fit(cfg: Config, run: RunDir, data: DatasetSplits, device: torch.device, resume: dict | None,
        faults: Faults = NO_FAULTS, cache_dir: Path | None = None, ctx: Distributed = SINGLE,
        tracker: TrackerSet = NO_TRACKER) -> FitResult:
    """Train per `cfg` into `run`; `resume` is the checkpoint bundle to continue from.

    Under torchrun (`ctx`) every rank runs this on its shard of the data; rank 0 alone
    validates and writes, and the ranks meet at each validation and checkpoint.
    Raises TrainingStopped (after saving last.pt) when SIGINT/SIGTERM asks it to stop.
    `tracker`: the experiment trackers the recorder also logs to (rank 0's; see tracking/).
    """
    tcfg = cfg.train
    plan = plan_training(tcfg, len(data.train), ctx.world_size)
    if tcfg.time_budget is not None:
        plan = _plan_time_budget(cfg, data, device, plan, resume, cache_dir, ctx)
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    train_loader, val_loader, recal_loader, sampler = _build_loaders(
        cfg, data, cache_dir, _mosaic_until(cfg, total_steps, steps_per_epoch), ctx)
    parts = _build_step_parts(cfg, device, len(data.class_names), str(run.last_ckpt), total_steps, resume, ctx,
                              plan.micro_batches, steps_per_epoch)
    ckpt_cfg = tcfg.checkpoint
    progress, best = (restore_bundle(resume, parts, run, ctx) if resume is not None
                      else (Progress(), Best(ckpt_cfg.best_metric, ckpt_cfg.best_mode)))
    broadcast_state(ctx, parts.model)  # the ranks start from the same weights, whatever their seeds
    stages = StageSwitch(parts.model, tcfg.stages) if tcfg.stages else None
    early = EarlyStopping(tcfg.early_stop)
    if resume is not None and resume.get("early_stop"):
        early.load_state_dict(resume["early_stop"])
    if resume is not None and resume["runtime"].get("world_size", 1) != ctx.world_size:
        # --allow-world-size-change: go on from the first step the new processes have not trained
        progress.step_in_epoch = resume["sampler"]["start"] // plan.images_per_step
    if progress.step_in_epoch >= steps_per_epoch:  # epochs got shorter (a resume with --allow-drift)
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    result = FitResult(best=best, num_params=count_parameters(parts.model), start_step=progress.global_step,
                       start_samples=progress.samples_seen, weights=parts.weights,
                       optimizer_groups=describe_groups(parts.optimizer), plan=plan)
    log.info("model: %.2fM parameters (%.2fM trainable); %d train / %d val images; %d steps per epoch, %d steps "
             "in all", result.num_params / 1e6, parts.weights["freeze"]["trainable_params"] / 1e6, len(data.train),
             len(data.val), steps_per_epoch, total_steps)
    if ctx.enabled:
        log.info("%d processes (%s): %d images per process and micro-batch, %d per optimizer step in all",
                 ctx.world_size, ctx.backend, plan.batch_size, plan.images_per_step)
    if progress.global_step >= total_steps or early.stopped:
        log.info("the run is already complete (step %d of %d%s): nothing left to train", progress.global_step,
                 total_steps, ", stopped early" if early.stopped else "")

    saved_at = -1

    def save(improved: bool, epoch_done: bool = False) -> None:
        """Checkpoint the step on rank 0. Its files are committed only once every rank has
        met it there: a rank that died or hung leaves the previous checkpoint in place."""
        nonlocal saved_at
        staged, error = None, None
        if ctx.is_main:
            try:
                parts.guard.check_weights(progress.global_step, parts.model, parts.ema.module if parts.ema else None)
                bundle = {**make_bundle(cfg, data, run, parts, progress, sampler, best, plan),
                          "early_stop": early.state_dict()}
                snapshot = progress.epoch if epoch_done and tcfg.checkpoint.keep_epochs else None
                staged = stage_checkpoint(run, bundle, best=improved, epoch=snapshot,
                                          on_write=faults.save_monitor(progress.global_step))
            except DetpactError as exc:
                error = exc
        try:
            meet(ctx, f"the checkpoint of step {progress.global_step}")
            _stop_together(ctx, error, device, progress.global_step)
            if staged is not None:
                try:
                    staged.commit(tcfg.checkpoint.keep_epochs)
                except DetpactError as exc:
                    error = exc
            _stop_together(ctx, error, device, progress.global_step)
        finally:
            if staged is not None:
                staged.discard()
        saved_at = progress.global_step

    def validate() -> bool:
        recorder.phase("eval", progress.global_step, progress.epoch)
        metrics = None
        if ctx.is_main:  # validation runs once, on rank 0; the others wait for its metrics
            eval_model = parts.ema.module if parts.ema is not None and tcfg.ema.eval else parts.model
            if recal_loader is not None:  # the statistics go into the checkpoint with the weights
                # the epoch just trained: a finished one has already moved progress.epoch on
                recal_loader.sampler.epoch = progress.epoch - 1 if progress.step_in_epoch == 0 else progress.epoch
                recalibrate_batchnorm(eval_model, recal_loader, device, cfg.run.amp, cfg.run.channels_last)
            metrics = evaluate(eval_model, val_loader, data.val, data.class_names, cfg.model.postprocess,
                               device, cfg.run.amp, cfg.run.channels_last, cfg.eval)
        metrics = broadcast_from_main(ctx, metrics)
        recorder.validation(progress.global_step, progress.epoch, metrics)
        # The metrics are None when the val split has no ground truth; the first validation
        # still writes best.pt so that export always has a checkpoint to take.
        score = metrics[best.metric]
        improved = best.improved_by(score)
        if improved:
            best.value, best.step, best.epoch = score, progress.global_step, progress.epoch
            best.map50_95 = metrics["map50_95"]
        log.info("step %d epoch %d: val map50_95 %s map50 %s%s", progress.global_step, progress.epoch,
                 _fmt(metrics["map50_95"]), _fmt(metrics["map50"]),
                 f" (best {best.metric})" if improved else "")
        result.last_val = metrics
        early.update(metrics)
        return improved

    started = time.perf_counter()

    def finish(end_reason: str) -> FitResult:
        result.end_reason, result.progress, result.train_seconds = end_reason, progress, time.perf_counter() - started
        result.nonfinite_skipped, result.skip_counts = parts.guard.skipped, dict(parts.guard.counts)
        return result

    with stop_on_signals() as stop, train_progress(total_steps, progress.global_step,
                                                   cfg.logging.progress and ctx.is_main) as bar:
        recorder = (Recorder(run, bar, cfg.logging.status_every_s, total_steps, progress.global_step, tracker)
                    if ctx.is_main else NullRecorder())
        batches: Iterator | None = None
        try:
            while progress.global_step < total_steps and not early.stopped:
                if batches is None:  # an epoch starts, or resumes at step_in_epoch
                    sampler.set_epoch(progress.epoch, start=progress.step_in_epoch * plan.images_per_step)
                    batches = iter(train_loader)
                step = progress.global_step + 1
                lr = lr_at(progress.global_step, total_steps, tcfg.optimizer.lr, tcfg.scheduler, steps_per_epoch)
                if stages is not None:
                    lr *= stages.update(progress.global_step)
                # Every batch of the epoch is used: its last step may accumulate fewer of them.
                micro = min(plan.micro_batches, plan.batches_per_epoch - progress.step_in_epoch * plan.micro_batches)
                stats = train_step(parts, batches, lr, step, faults, micro)
                skip_reason = parts.guard.record(ok=stats is not None)
                progress.global_step, progress.step_in_epoch = step, progress.step_in_epoch + 1
                images = plan.images_in_step(progress.step_in_epoch - 1)
                progress.samples_seen += images
                recorder.step(step, progress.epoch, lr, images, stats, parts.guard.skipped,
                              extra={"skip_reason": skip_reason,
                                     **({"stage": stages.current} if stages is not None else {})})
                parts.guard.check(step)  # may abort: after the step's line is on disk

                # The step boundary: end of epoch, validation, checkpoint, stop.
                epoch_done = progress.step_in_epoch == steps_per_epoch
                if epoch_done:
                    progress.epoch, progress.step_in_epoch, batches = progress.epoch + 1, 0, None
                finished = progress.global_step >= total_steps
                due = (epoch_done and _due(cfg.eval.every_epochs, progress.epoch)) or _due(cfg.eval.every_steps, step)
                improved = validate() if finished or due else False
                if improved or finished or early.stopped or _due(tcfg.checkpoint.every_steps, step) or (
                        epoch_done and (_due(tcfg.checkpoint.every_epochs, progress.epoch)
                                        or tcfg.checkpoint.keep_epochs)):
                    save(improved, epoch_done)
                faults.after_step(step)
                # The ranks stop at the same step. The signal may have come at any point of
                # the step: its state is saved now.
                if any_rank(ctx, stop.requested, device):
                    if saved_at != step:
                        save(improved=False)
                    raise TrainingStopped(
                        f"Training stopped by {stop.signal_name or 'a signal to another rank'} after step {step} of "
                        f"{total_steps} (epoch {progress.epoch}); its full state is saved in {run.last_ckpt}.",
                        stop.signum or signal.SIGTERM, run.root.name)
        except (TrainingStopped, TrainingAborted) as exc:
            # The run ends here on purpose: its report is still written, saying why (api.train).
            reason = "signal" if isinstance(exc, TrainingStopped) else exc.reason
            recorder.phase("stopped" if reason == "signal" else "failed", progress.global_step, progress.epoch,
                           end_reason=reason)
            exc.fit_result = finish(reason)
            raise
        except BaseException:
            recorder.phase("failed", progress.global_step, progress.epoch)
            raise
        finally:
            recorder.close()
    finish("early_stop" if early.stopped else "time_budget" if plan.time_budget else "steps_done")
    if tcfg.continual.save_state and ctx.is_main:  # what the next task's penalties hold to (engine/penalties)
        save_continual_state(run.continual_state, tcfg.continual, parts.penalties,
                             parts.ema.module if parts.ema is not None and tcfg.ema.eval else parts.model,
                             build_criterion(cfg.model.head), eval_loader(data.train, cfg.data, tcfg.batch_size),
                             device, cfg.run.amp, cfg.run.channels_last,
                             weights=run.best_ckpt if run.best_ckpt.is_file() else None)
    recorder.phase("trained", progress.global_step, progress.epoch, end_reason=result.end_reason)
    return result


def _stop_together(ctx: Distributed, error: DetpactError | None, device: torch.device, step: int) -> None:
    """Every rank raises when rank 0 could not write its checkpoint (`error`, on rank 0)."""
    if any_rank(ctx, error is not None, device):
        raise error or TrainingAborted(f"Training aborted at step {step}: rank 0 could not write its checkpoint "
                                       "(its log says why).")


def _plan_time_budget(cfg: Config, data: DatasetSplits, device: torch.device, plan: TrainPlan,
                      resume: dict | None, cache_dir: Path | None, ctx: Distributed) -> TrainPlan:
    """The plan with its length set by train.time_budget: the resumed run's recorded one,
    else measured now on throwaway copies of the loaders and the model (rank 0's
    measurement for every rank)."""
    budget = (resume or {}).get("time_budget")
    if budget is None:
        loader, val_loader, _, sampler = _build_loaders(cfg, data, cache_dir, None, ctx)

        def throwaway() -> tuple[StepParts, DataLoader, DataLoader]:
            parts = _build_step_parts(cfg, device, len(data.class_names), os.devnull, plan.total_steps,
                                      ctx=ctx, micro_batches=plan.micro_batches, steps_per_epoch=plan.steps_per_epoch)
            return parts, loader, val_loader

        log.info("train.time_budget: timing %d steps and %d validation batches to plan the run's length",
                 budget_module.WARMUP_STEPS + budget_module.TIMED_STEPS, budget_module.TIMED_VAL_BATCHES)
        step_s, validation_s = budget_module.measure(throwaway, sampler.set_epoch,
                                                     plan.micro_batches, cfg.train.optimizer.lr)
        evals = cfg.eval
        per_step = ((1 / (plan.steps_per_epoch * evals.every_epochs) if evals.every_epochs else 0.0)
                    + (1 / evals.every_steps if evals.every_steps else 0.0))
        hours = cfg.train.time_budget
        steps = budget_module.steps_within(hours * 3600, step_s, validation_s, per_step, cfg.train.max_steps)
        budget = broadcast_from_main(ctx, budget_module.describe(hours, step_s, validation_s, steps))
    log.info("train.time_budget %.3g h: %d optimizer steps (%.3f s per step, %.1f s per validation, measured)",
             budget["hours"], budget["total_steps"], budget["step_seconds"], budget["validation_seconds"])
    return replace(plan, total_steps=budget["total_steps"], time_budget=budget)


def _build_step_parts(cfg: Config, device: torch.device, num_classes: int, last_ckpt: str,
                      total_steps: int, resume: dict | None = None, ctx: Distributed = SINGLE,
                      micro_batches: int = 1, steps_per_epoch: int = 1) -> StepParts:
    model = sync_batchnorm(ctx, build_model(cfg.model, num_classes), cfg.train.ddp.sync_bn, device)
    # Starting weights and freezing come before the optimizer and the EMA take the model's
    # parameters. A resume's weights come from its checkpoint, with their record.
    weights = apply_initial_weights(model, cfg.model) if resume is None else carried_initial_weights(resume)
    model = model.to(device)
    # train.quant: the Linear weights quantised and frozen on the device; under torchrun every rank quantises
    # rank 0's weights (the broadcast in fit comes too late for them)
    if cfg.train.quant != "none":
        broadcast_state(ctx, model)
    weights["quant"] = apply_quant(model, cfg.train.quant, cfg.train.quant_required, device)
    if cfg.train.lora.r:  # adapters on the loaded (and quantised: QLoRA) weights, before freezing
        weights["lora"] = apply_lora(model, cfg.train.lora)
    weights["freeze"] = apply_freeze(model, cfg.model)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    tcfg = cfg.train
    criterion = build_criterion(cfg.model.head, normaliser=global_normaliser(ctx, device) if ctx.enabled
                                else local_normaliser)
    balance = build_loss_balance(tcfg, criterion.components, steps_per_epoch, device)
    return StepParts(
        model=model,
        criterion=criterion,
        optimizer=build_optimizer(model, tcfg.optimizer, balance.aligner if balance is not None else None),
        ema=ModelEMA(model, tcfg.ema, total_steps) if tcfg.ema.enabled else None,
        scaler=torch.amp.GradScaler(device.type) if cfg.run.amp == "fp16" else None,
        guard=NonFiniteGuard(tcfg.nonfinite.max_consecutive if tcfg.nonfinite.policy == "skip" else 1, last_ckpt),
        device=device, amp=cfg.run.amp, channels_last=cfg.run.channels_last,
        grad_clip=tcfg.grad_clip, accumulate=micro_batches,
        multi_scale=MultiScale(cfg.run.seed, cfg.data.image_size, cfg.data.multi_scale) if cfg.data.multi_scale else None,
        weights=weights, dist=ctx, balance=balance,
        penalties=build_penalties(tcfg.continual, model, criterion, device, cfg.run.amp, cfg.run.seed + ctx.rank,
                                  multi_scale=bool(cfg.data.multi_scale), world_size=ctx.world_size),
        mim=MIMObjective(cfg.model.mim_weight, cfg.run.seed + ctx.rank) if cfg.model.mim_decoder else None,
    )


def _mosaic_until(cfg: Config, total_steps: int, steps_per_epoch: int) -> int | None:
    """The first epoch trained without mosaic (data.augment.close_mosaic_epochs), if any."""
    close = cfg.data.augment.close_mosaic_epochs
    return max(0, math.ceil(total_steps / steps_per_epoch) - close) if close else None


def _build_loaders(cfg: Config, data: DatasetSplits, cache_dir: Path | None = None,
                   mosaic_until: int | None = None, ctx: Distributed = SINGLE) -> tuple[DataLoader, DataLoader, DataLoader | None,
                                                             ResumableSampler]:
    """Training loader (augmented, resumable order), validation loader and the loader of
    training images for BatchNorm recalibration (None when that is off).

    cache_dir: the detpact cache folder; `data.cache: disk` keeps decoded images under
    its `images/` (required for that mode). mosaic_until: the first epoch without mosaic.
    """
    dcfg = cfg.data
    cache = ImageCache(dcfg.cache, cache_dir / "images" if cache_dir is not None else None)
    train_ds = DetectionDataset(data.train, dcfg.image_size, train=True, seed=cfg.run.seed, augment=dcfg.augment,
                                cache=cache, mosaic_until=mosaic_until)
    sampler = ResumableSampler(len(train_ds), cfg.run.seed, rank=ctx.rank, world_size=ctx.world_size)
    workers = resolve_num_workers(dcfg.num_workers)
    train_loader = make_loader(train_ds, cfg.train.batch_size, workers, sampler, drop_last=cfg.train.drop_last)
    recal, recal_loader = cfg.train.recalibrate_bn, None
    if recal.enabled:
        picked = EpochSampler(recalibration_indices(len(data.train), recal.images))
        recal_loader = (make_loader(train_ds, cfg.train.batch_size, workers, picked) if recal.transform == "train"
                        else eval_loader(data.train, dcfg, cfg.train.batch_size, cache, picked))
    return train_loader, eval_loader(data.val, dcfg, cfg.eval.batch_size, cache), recal_loader, sampler


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count > 0 and count % every == 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
