"""One optimizer step: forward, loss, non-finite guard, backward (accumulated over
micro-batches), clip, step, EMA. `fit()` (engine/loop.py) calls it once per step."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from detpact.engine.balance import LossBalance
from detpact.engine.distributed import SINGLE, Distributed, average_gradients, broadcast_buffers, sum_values
from detpact.engine.ema import ModelEMA
from detpact.engine.evaluate import prepare_images
from detpact.engine.faults import NO_FAULTS, Faults
from detpact.engine.guards import SKIP_KINDS, NonFiniteGuard
from detpact.engine.multiscale import MultiScale, rescale_batch
from detpact.engine.optim import set_lr
from detpact.engine.penalties import Penalties
from detpact.engine.runtime import autocast
from detpact.models.losses import Criterion
from detpact.models.mim import MIMObjective

log = logging.getLogger(__name__)


@dataclass
class StepParts:
    """What one optimizer step touches."""

    model: nn.Module
    criterion: Criterion
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None
    scaler: torch.amp.GradScaler | None
    guard: NonFiniteGuard
    device: torch.device
    amp: str
    channels_last: bool
    grad_clip: float | None
    accumulate: int
    multi_scale: MultiScale | None = None
    # Where the model's starting weights came from and what is frozen: the checkpoint's
    # "weights" entry ({"init_from", "backbone_weights", "freeze"}, plain values).
    weights: dict[str, Any] = field(default_factory=dict)
    dist: Distributed = SINGLE
    balance: LossBalance | None = None  # loss balancing; None = the criterion's own loss
    penalties: Penalties | None = None  # continual-learning terms added to the loss (engine/penalties)
    mim: MIMObjective | None = None  # model.mim_decoder's masked-image loss, logged as loss_mim

    def __post_init__(self) -> None:
        aligner = self.balance.aligner if self.balance is not None else None
        extra = list(aligner.parameters()) if aligner is not None else []
        self.trainable = [p for p in self.model.parameters() if p.requires_grad] + extra


def train_step(parts: StepParts, batches: Iterator, lr: float, step: int, faults: Faults = NO_FAULTS,
               micro_batches: int | None = None) -> dict[str, float] | None:
    """Optimizer step number `step`, over `micro_batches` batches (default `parts.accumulate`;
    an epoch's last step may have fewer). Returns its metrics, or None when the step was
    skipped because the loss or the gradients were not finite, or (one process) it ran out
    of memory; the guard is told why (`parts.guard.note`)."""
    micro_batches = micro_batches or parts.accumulate
    size = parts.multi_scale.size_at(step) if parts.multi_scale else None
    set_lr(parts.optimizer, lr)
    parts.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    finite = True
    images_seen = 0
    for micro in range(1, micro_batches + 1):
        images, targets = next(batches)
        images_seen += len(images)
        # After a non-finite loss the group's remaining batches are still drawn, so that
        # the data order does not depend on it; with several processes their losses are
        # still computed (the loss normaliser is shared), but not back-propagated.
        if finite or parts.dist.enabled:
            try:
                failure = _accumulate_gradients(parts, images, targets, sums, micro_batches, size, step,
                                                faults.poison_at(step), backward=finite, micro=micro)
            except torch.OutOfMemoryError:
                if parts.dist.enabled:
                    raise  # the other ranks are inside this micro-batch's collectives: the run fails
                failure = "oom"
                parts.optimizer.zero_grad(set_to_none=True)
                if parts.device.type == "cuda":
                    torch.cuda.empty_cache()
            if failure is not None:
                finite = False
                parts.guard.note(failure)
                where = f" on rank {parts.dist.rank}" if parts.dist.enabled else ""
                log.warning("step %d: %s%s; the step is skipped", step, _FAILURES[failure], where)
        faults.after_microbatch(step, micro)
    if parts.dist.enabled:
        finite = _agree_across_ranks(parts, finite, sums)
    if finite:
        if parts.scaler:
            parts.scaler.unscale_(parts.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parts.trainable, parts.grad_clip or float("inf"), foreach=True
        ).item()
        finite = math.isfinite(grad_norm)
        if not finite:
            parts.guard.note("nan" if math.isnan(grad_norm) else "inf")
        if parts.scaler:
            # GradScaler skips the update itself on inf/NaN gradients and lowers its scale.
            # (It needs gradients to have been unscaled: after a non-finite loss it is left alone.)
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        elif finite:
            parts.optimizer.step()
        if finite and parts.penalties is not None:
            parts.penalties.after_step(parts.model)  # SI's path integral: this step's gradient and move
    if not finite:
        parts.optimizer.zero_grad(set_to_none=True)
        return None
    broadcast_buffers(parts.dist, parts.model)  # every rank gathered its own BatchNorm statistics
    if parts.ema is not None:
        parts.ema.update(parts.model)
    return {**sums, "grad_norm": grad_norm, "images": images_seen * parts.dist.world_size}


_FAILURES = {"nan": "the loss is NaN", "inf": "the loss is infinite", "oom": "out of memory"}
# Summed over ranks rather than averaged: they count things in the whole step.
_SUMMED_STATS = ("num_pos",)


def _agree_across_ranks(parts: StepParts, finite: bool, sums: dict[str, float]) -> bool:
    """With several processes: whether every rank's loss was finite (a non-finite loss on
    one rank makes all of them skip the step, and each notes why), then the gradients
    averaged over ranks and `sums` turned into the step's values over all ranks."""
    had_grad = [p.grad is not None for p in parts.trainable]
    failures = [float(kind in parts.guard.reasons) for kind in SKIP_KINDS]
    totals = sum_values(parts.dist, [*failures, *map(float, had_grad)], parts.device)
    if any(totals[:len(SKIP_KINDS)]):
        for kind, count in zip(SKIP_KINDS, totals):
            if count:
                parts.guard.note(kind)
        return False
    had_grad_anywhere = [count > 0 for count in totals[len(SKIP_KINDS):]]
    average_gradients(parts.dist, parts.trainable, had_grad_anywhere)
    keys = sorted(sums)
    reduced = sum_values(parts.dist, [sums[k] for k in keys], parts.device)
    sums.update({k: v if k in _SUMMED_STATS else v / parts.dist.world_size for k, v in zip(keys, reduced)})
    return True


def _accumulate_gradients(parts: StepParts, images: torch.Tensor, targets: list[dict], sums: dict[str, float],
                          micro_batches: int, size: int | None, step: int, poison: str | None = None,
                          backward: bool = True, micro: int = 1) -> str | None:
    """Forward and backward of one micro-batch (resized to `size` for multi-scale training),
    adding its share to `sums`. Returns None, or "nan" / "inf" when its loss is not finite
    (nothing is back-propagated then, nor when `backward` is False). `poison` (fault
    injection): "nan" makes the loss NaN, "oom" raises an out-of-memory error."""
    pixels = prepare_images(images, parts.device, parts.channels_last)
    if size is not None:
        pixels, targets = rescale_batch(pixels, targets, size)
    with autocast(parts.device, parts.amp):
        if poison == "oom":
            raise torch.OutOfMemoryError("out of memory (injected by DETPACT_FAULT)")
        outputs = parts.model(pixels, targets)
    # float32, outside autocast
    if parts.balance is None:
        losses, logged = parts.criterion(outputs, targets), {}
        total = losses["loss"]
    else:  # the criterion's "loss" is still what is logged, for runs to stay comparable
        losses, terms = parts.criterion.with_terms(outputs, targets)
        total, logged = parts.balance.total(terms, step)
    if parts.penalties is not None:  # logged as their own components; "loss" stays the criterion's
        penalties = parts.penalties.losses(parts.model, pixels, targets, outputs)
        total = total + sum(penalties.values())
        logged = {**logged, **{k: float(v.detach()) for k, v in penalties.items()}}
    if parts.mim is not None:  # masked-image reconstruction, its own forward on masked pixels (models/mim.py)
        with autocast(parts.device, parts.amp):
            mim = parts.mim.loss(parts.model, pixels, step, micro)
        total = total + mim
        logged = {**logged, "loss_mim": float(mim.detach())}
    if poison == "nan":
        total = total * float("nan")
    value = total.detach().item()
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    if not backward:
        return None
    loss = total / micro_batches
    (parts.scaler.scale(loss) if parts.scaler else loss).backward()
    for key, value in [*((k, float(v.detach())) for k, v in losses.items()), *logged.items()]:
        sums[key] = sums.get(key, 0.0) + value / micro_batches
    return None
