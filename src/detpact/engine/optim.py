"""Optimizer with explicit decay / no-decay groups, and the LR schedule as a pure function."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from detpact.config import OptimizerConfig, SchedulerConfig

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on conv/linear weights (not on norms, biases or scales).
    Frozen parameters (requires_grad False, `model.freeze`) are left out."""
    decay, no_decay, frozen = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
        else:
            frozen.append(param)
    log.info(
        "optimizer %s: %d decayed tensors (%d params), %d not decayed (%d params), %d frozen left out (%d params)",
        cfg.name, len(decay), sum(p.numel() for p in decay), len(no_decay), sum(p.numel() for p in no_decay),
        len(frozen), sum(p.numel() for p in frozen),
    )
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def warmup_length(cfg: SchedulerConfig, total_steps: int, steps_per_epoch: int) -> int:
    """Warm-up steps: `warmup_steps`, else 3 epochs but at most a tenth of the run (a short
    run must not spend itself warming up); never the whole run."""
    steps = cfg.warmup_steps if cfg.warmup_steps is not None else min(3 * steps_per_epoch, total_steps // 10)
    return min(steps, max(total_steps - 1, 0))


def lr_at(step: int, total_steps: int, base_lr: float, cfg: SchedulerConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine decay.

    A pure function of the step, so resuming needs nothing but the step counter.
    """
    warmup = warmup_length(cfg, total_steps, steps_per_epoch)
    if step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    min_lr = base_lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
