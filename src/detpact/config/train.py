"""`train:` length, batch, optimizer, schedule, EMA, checkpoints, non-finite guard."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from detpact.config.section import Section


class OptimizerConfig(Section):
    # adamw: decoupled weight decay; sgd: momentum SGD with L2 weight decay (as YOLO's).
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd
    nesterov: bool = False  # sgd
    # No weight decay on biases, and on the weights of normalisation layers (decaying a
    # scale towards 0 only fights the normalisation). Other vectors and scalars (e.g.
    # learned scales) never decay.
    wd_exclude_bias: bool = True
    wd_exclude_norm: bool = True
    # Multipliers of lr and weight_decay for the backbone's parameters and for all the
    # others (neck, projector, head): e.g. backbone_lr_mult 0.1 fine-tunes a pretrained
    # backbone slower than the new head (RT-DETR trains its backbone at 0.1x).
    backbone_lr_mult: float = Field(1.0, ge=0.0)
    head_lr_mult: float = Field(1.0, ge=0.0)
    backbone_wd_mult: float = Field(1.0, ge=0.0)
    head_wd_mult: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _sgd_nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("train.optimizer.nesterov needs a momentum above 0")
        return self


class SchedulerConfig(Section):
    """The learning rate as a pure function of the optimizer step (engine/optim.py: lr_at)."""

    # After the warm-up: none (constant), linear or cosine decay to min_lr_ratio x lr,
    # onecycle (a half-cosine rise over the warm-up, then cosine decay), multistep
    # (x gamma at each milestone).
    name: Literal["none", "linear", "cosine", "onecycle", "multistep"] = "cosine"
    # Warm-up length in optimizer steps; None = 3 epochs, at most 10 % of the run (onecycle:
    # 30 % of the run, torch's pct_start).
    warmup_steps: int | None = Field(None, ge=0)
    # The warm-up starts from warmup_init x lr.
    warmup_init: float = Field(0.0, ge=0.0, le=1.0)
    # The final learning rate of linear, cosine and onecycle, as a fraction of lr.
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    # multistep: optimizer steps at which the learning rate is multiplied by gamma.
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _milestones_increase(self) -> SchedulerConfig:
        if self.name == "multistep" and not self.milestones:
            raise ValueError("train.scheduler.milestones is required by the multistep schedule (e.g. [800, 1100])")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or any(m < 1 for m in self.milestones):
            raise ValueError(f"train.scheduler.milestones must be increasing step numbers >= 1, got {self.milestones}")
        return self


class EMAConfig(Section):
    enabled: bool = True
    # None = a fifth of the run: 1 - 5 / total_steps, at most 0.9998 (engine/ema.py).
    decay: float | None = Field(None, gt=0.0, lt=1.0)
    # The effective decay ramps up as decay * (1 - exp(-updates / warmup_steps)),
    # so a short run's EMA tracks the model instead of lagging behind its init.
    # None = a tenth of the run.
    warmup_steps: int | None = Field(None, ge=1)
    # Average BatchNorm running statistics with the weights (as Ultralytics does) instead of
    # copying the model's: steadier long runs, worse short ones (docs/recipe.md). With
    # recalibrate_bn on, validation and checkpoints use recalibrated statistics instead.
    average_buffers: bool = False
    # Validate, choose best.pt, export and predict with the EMA weights (true) or the raw
    # ones (false; the EMA is still kept and checkpointed).
    eval: bool = True


class BNRecalibrationConfig(Section):
    # Before every validation the evaluated (EMA) model's BatchNorm statistics are
    # recomputed on this many training images and saved with it (engine/recalibrate.py):
    # the statistics gathered in training come from the raw model, which the EMA lags.
    # Off by default: it lifted a long run but lowered the 36-epoch ones (docs/recipe.md).
    enabled: bool = False
    images: int = Field(256, ge=1)
    # val: the plain letterbox of validation; train: the images as the epoch just trained
    # augmented them (mosaic while it is on).
    transform: Literal["val", "train"] = "val"


class EarlyStopConfig(Section):
    # End the run after this many validations in a row without improvement; None = off.
    patience: int | None = Field(None, ge=1)
    # An improvement must beat the best value so far by more than this.
    min_delta: float = Field(0.0, ge=0.0)
    metric: Literal["map50_95", "map50", "map75"] = "map50_95"


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1)
    every_epochs: int | None = Field(1, ge=1)


class NonFiniteConfig(Section):
    # skip: a step whose loss or gradients are not finite is skipped, and max_consecutive
    # of them in a row abort the run; abort: the first one does. The last good checkpoint
    # stays in place either way.
    policy: Literal["skip", "abort"] = "skip"
    max_consecutive: int = Field(5, ge=1)


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    # Optimizer steps; the run ends at whichever of epochs / max_steps comes first.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    # Images per optimizer step whatever the batch size: the gradients of
    # round(nominal_batch / batch_size) batches are accumulated (YOLO's nbs), so that a
    # smaller batch does not change the recipe.
    nominal_batch: int | None = Field(64, ge=1)
    # Or a fixed number of batches per optimizer step: a value above 1 (without
    # nominal_batch) turns nominal_batch off; nominal_batch: null alone steps every batch.
    accumulate: int = Field(1, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    grad_clip: float | None = Field(10.0, gt=0.0)
    ema: EMAConfig = EMAConfig()
    recalibrate_bn: BNRecalibrationConfig = BNRecalibrationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    nonfinite: NonFiniteConfig = NonFiniteConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()

    @model_validator(mode="after")
    def _one_way_to_accumulate(self) -> TrainConfig:
        if self.accumulate != 1 and "nominal_batch" not in self.model_fields_set:
            self.nominal_batch = None  # a fixed accumulation asked for: the nominal batch steps aside
        if self.nominal_batch is not None and self.accumulate != 1:
            raise ValueError("set train.accumulate or train.nominal_batch, not both "
                             "(train.nominal_batch: null to accumulate a fixed number of batches)")
        return self

    @property
    def micro_batches(self) -> int:
        """Batches per optimizer step (from `nominal_batch` when it is set)."""
        if self.nominal_batch is None:
            return self.accumulate
        return max(1, round(self.nominal_batch / self.batch_size))

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.micro_batches
