"""The run's shape in steps: batches per epoch, optimizer steps per epoch and in all.

Everything here is a pure function of the config, the training split's size and the
number of processes, so that a resume recomputes exactly the plan the run started with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from detpact.config import TrainConfig
from detpact.errors import DetpactError


@dataclass(frozen=True)
class TrainPlan:
    batch_size: int  # images per micro-batch, per process
    world_size: int  # training processes
    micro_batches: int  # batches accumulated per optimizer step
    batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    epoch_images: int  # images trained per epoch, over all processes
    time_budget: dict[str, Any] | None = None  # train.time_budget's measured plan (engine/budget.py)

    @property
    def global_batch(self) -> int:
        """Images per micro-batch over all processes."""
        return self.batch_size * self.world_size

    @property
    def images_per_step(self) -> int:
        """Images per optimizer step over all processes."""
        return self.global_batch * self.micro_batches

    def images_in_step(self, step_in_epoch: int) -> int:
        """Images over all processes in step `step_in_epoch` (0-based) of an epoch: the last
        may take fewer (its accumulation group, or with drop_last off its batch, is short)."""
        return min(self.images_per_step, self.epoch_images - step_in_epoch * self.images_per_step)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "global_batch": self.global_batch, "images_per_step": self.images_per_step}


def plan_training(tcfg: TrainConfig, num_train: int, world_size: int = 1) -> TrainPlan:
    """The plan of a run on `num_train` images with `world_size` processes.

    Each process takes train.batch_size images per micro-batch; train.nominal_batch counts
    images over all processes (the gradients of round(nominal_batch / global batch)
    micro-batches are accumulated), so that more processes do not change the recipe.
    A partial last batch is dropped (train.drop_last) or trained; with several processes
    the images that cannot give every process one are left out of the epoch. A user
    error when the split cannot fill one global batch.
    """
    global_batch = tcfg.batch_size * world_size
    if num_train < global_batch:
        per = f" ({world_size} processes x train.batch_size {tcfg.batch_size})" if world_size > 1 else ""
        raise DetpactError(
            f"The training split has {num_train} images, fewer than one batch of {global_batch}{per}. "
            "Lower train.batch_size or add images."
        )
    if tcfg.nominal_batch is None:
        micro_batches = tcfg.accumulate
    else:
        micro_batches = max(1, round(tcfg.nominal_batch / global_batch))
    per_process = num_train // world_size
    if tcfg.drop_last:
        batches_per_epoch = per_process // tcfg.batch_size
        epoch_images = batches_per_epoch * global_batch
    else:
        batches_per_epoch = math.ceil(per_process / tcfg.batch_size)
        epoch_images = per_process * world_size
    steps_per_epoch = math.ceil(batches_per_epoch / micro_batches)
    total_steps = min(tcfg.epochs * steps_per_epoch, tcfg.max_steps or math.inf)
    return TrainPlan(tcfg.batch_size, world_size, micro_batches, batches_per_epoch, steps_per_epoch,
                     int(total_steps), epoch_images)
