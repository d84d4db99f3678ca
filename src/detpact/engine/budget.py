"""A wall-clock budget for training (train.time_budget, as Ultralytics' `time`).

The run's length in optimizer steps is planned once, before training, from a measured
warm-up: a few real steps on a throwaway copy of the model, and a few validation
batches. The plan is recorded in every checkpoint and a resume keeps it, so the LR
schedule, the EMA and the data order are those of a run of that fixed length: the run
stays exact. The budget is a target, not a deadline: validations and checkpoints are
estimated, and a noisy machine can be slower than the warm-up said.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from detpact.engine.evaluate import prepare_images
from detpact.engine.runtime import autocast, rng_state, set_rng_state
from detpact.engine.step import StepParts, train_step

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # not timed: loader start-up, first kernels
TIMED_STEPS = 3
TIMED_VAL_BATCHES = 2


def steps_within(budget_s: float, step_s: float, validation_s: float, validations_per_step: float,
                 max_steps: int | None) -> int:
    """How many optimizer steps fit in `budget_s` seconds when a step takes `step_s`, a
    validation `validation_s`, and there are `validations_per_step` validations per step
    (plus the final one). At least 1, at most `max_steps`."""
    per_step = step_s + validation_s * validations_per_step
    steps = max(1, math.floor((budget_s - validation_s) / per_step))
    return min(steps, max_steps) if max_steps else steps


def measure(build: Callable[[], tuple[StepParts, DataLoader, DataLoader]], start_epoch: Callable[[int], None],
            micro_batches: int, lr: float) -> tuple[float, float]:
    """Seconds per optimizer step (median of the timed steps) and per validation pass
    (timed batches x the loader's batches) of the throwaway model and loaders `build`
    makes. Every global RNG stream is afterwards as it was before `build`, so the run
    that follows starts exactly as it would have without the measurement."""
    saved = rng_state()
    try:
        parts, loader, val_loader = build()
        batches = _endless(loader, start_epoch)
        times = []
        for step in range(1, WARMUP_STEPS + TIMED_STEPS + 1):
            started = time.perf_counter()
            train_step(parts, batches, lr, step, micro_batches=micro_batches)
            times.append(time.perf_counter() - started)
        step_s = sorted(times[WARMUP_STEPS:])[TIMED_STEPS // 2]
        validation_s = _validation_seconds(parts, val_loader)
    finally:
        set_rng_state(saved)
    return step_s, validation_s


def _endless(loader: DataLoader, start_epoch: Callable[[int], None]) -> Iterator:
    """The loader's batches, epoch after epoch (a small split may not fill the warm-up)."""
    epoch = 0
    while True:
        start_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def _validation_seconds(parts: StepParts, val_loader: DataLoader) -> float:
    parts.model.eval()
    seconds, timed = 0.0, 0
    for images, _ in val_loader:
        started = time.perf_counter()
        with autocast(parts.device, parts.amp):
            parts.model(prepare_images(images, parts.device, parts.channels_last))
        seconds += time.perf_counter() - started
        timed += 1
        if timed == TIMED_VAL_BATCHES:
            break
    parts.model.train()
    return seconds / max(timed, 1) * len(val_loader)


def describe(hours: float, step_s: float, validation_s: float, total_steps: int) -> dict[str, Any]:
    """The plan as recorded in checkpoints and train_report.json."""
    return {"hours": hours, "step_seconds": round(step_s, 6), "validation_seconds": round(validation_s, 6),
            "total_steps": total_steps}
