"""The optimizer over explicit parameter groups, and the LR schedule as a pure function.

Groups are (backbone | head) x (decay | no_decay): "head" is everything that is not the
backbone (neck, projector, head). Each group carries its `lr_mult`, so `set_lr` applies
the schedule's value times the multiplier, and its own weight decay.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from detpact.config import OptimizerConfig, SchedulerConfig

log = logging.getLogger(__name__)

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """The optimizer's groups, in a fixed order, empty ones left out (so the same model and
    config always give the same groups: a checkpoint's optimizer state fits them).

    A parameter decays unless it is a bias (`wd_exclude_bias`), the weight of a
    normalisation layer (`wd_exclude_norm`) or another vector or scalar; frozen
    parameters (requires_grad False, `model.freeze`) are left out.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    sorted_params: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "head"
        if name.endswith("bias"):  # conv, linear, norm and attention (in_proj_bias) biases
            excluded = cfg.wd_exclude_bias
        elif id(param) in norm_params:
            excluded = cfg.wd_exclude_norm
        else:
            excluded = param.ndim < 2  # learned scales and gains
        sorted_params.setdefault(f"{part}/{'no_decay' if excluded else 'decay'}", []).append(param)
    mults = {"backbone": (cfg.backbone_lr_mult, cfg.backbone_wd_mult), "head": (cfg.head_lr_mult, cfg.head_wd_mult)}
    groups = []
    for name in ("backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"):
        if name in sorted_params:
            lr_mult, wd_mult = mults[name.split("/")[0]]
            decay = cfg.weight_decay * wd_mult if name.endswith("/decay") else 0.0
            groups.append({"params": sorted_params[name], "name": name, "lr_mult": lr_mult, "weight_decay": decay})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, aligner: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over `parameter_groups`; the groups are logged with their sizes. The
    task aligner's learned weights (train.task_aligner) get a group of their own, never
    decayed (decay would pull every weight back to 1)."""
    groups = parameter_groups(model, cfg)
    if aligner is not None:
        groups.append({"params": list(aligner.parameters()), "name": "task_aligner", "lr_mult": cfg.head_lr_mult,
                       "weight_decay": 0.0})
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    log.info("optimizer %s: %s; %d frozen tensors (%d params) left out", cfg.name,
             ", ".join(f"{g['name']} {g['tensors']} tensors ({g['params']} params, lr x{g['lr_mult']:g}, "
                       f"wd {g['weight_decay']:g})" for g in describe_groups(optimizer)),
             len(frozen), sum(p.numel() for p in frozen))
    return optimizer


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each group's name, size, lr multiplier and weight decay (plain values, for reports)."""
    return [{"name": g["name"], "tensors": len(g["params"]), "params": sum(p.numel() for p in g["params"]),
             "lr_mult": g["lr_mult"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]


def warmup_length(cfg: SchedulerConfig, total_steps: int, steps_per_epoch: int) -> int:
    """Warm-up steps: `warmup_steps`, else 3 epochs but at most a tenth of the run (a short
    run must not spend itself warming up; onecycle: 30 % of the run); never the whole run."""
    if cfg.warmup_steps is not None:
        steps = cfg.warmup_steps
    elif cfg.name == "onecycle":
        steps = int(0.3 * total_steps)
    else:
        steps = min(3 * steps_per_epoch, total_steps // 10)
    return min(steps, max(total_steps - 1, 0))


def lr_at(step: int, total_steps: int, base_lr: float, cfg: SchedulerConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based): warm-up from `warmup_init` x lr,
    then the named decay. A pure function of the step, so resuming needs nothing but the
    step counter.
    """
    warmup = warmup_length(cfg, total_steps, steps_per_epoch)
    if step < warmup:
        if cfg.name == "onecycle":  # a half-cosine rise
            rise = 0.5 * (1.0 - math.cos(math.pi * (step + 1) / (warmup + 1)))
            return base_lr * (cfg.warmup_init + (1.0 - cfg.warmup_init) * rise)
        # linear from warmup_init x lr: init * (warmup - step) + step + 1 is (warmup + 1) x the
        # fraction reached, written so that warmup_init 0 gives the recipe's exact bits
        return base_lr * (cfg.warmup_init * (warmup - step) + step + 1) / (warmup + 1)
    if cfg.name == "none":
        return base_lr
    if cfg.name == "multistep":
        return base_lr * cfg.gamma ** sum(step >= milestone for milestone in cfg.milestones)
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    min_lr = base_lr * cfg.min_lr_ratio
    if cfg.name == "linear":
        return min_lr + (base_lr - min_lr) * (1.0 - progress)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))  # cosine, onecycle


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's `lr` times each group's multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
