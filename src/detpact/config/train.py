"""`train:` length, batch, optimizer, schedule, EMA, checkpoints, non-finite guard."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from detpact.config.continual import ContinualConfig
from detpact.config.section import Section


class OptimizerConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    """`adamw` (decoupled weight decay) or `sgd` (momentum SGD, L2 weight decay as YOLO's).
    Parameters go into the groups `backbone/decay`, `backbone/no_decay`, `head/decay`,
    `head/no_decay` ("head": everything but the backbone), printed at start with their sizes
    and recorded under `optimizer` in `train_report.json`"""
    lr: float = Field(2e-3, gt=0.0)
    """peak learning rate"""
    weight_decay: float = Field(5e-4, ge=0.0)
    """weight decay of the decayed groups"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (`adamw`)"""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """momentum (`sgd`)"""
    nesterov: bool = False
    """Nesterov momentum (`sgd`; needs a momentum above 0)"""
    wd_exclude_bias: bool = True
    """no weight decay on biases"""
    wd_exclude_norm: bool = True
    """no weight decay on the weights of batch, group and layer norms (decaying a scale
    towards 0 only fights the normalisation); other vectors and scalars (learned scales)
    never decay"""
    backbone_lr_mult: float = Field(1.0, ge=0.0)
    """the backbone's learning rate is the schedule's times this (e.g. 0.1 to fine-tune a
    pretrained backbone slower than the new head, as RT-DETR trains its backbone at 0.1x)"""
    head_lr_mult: float = Field(1.0, ge=0.0)
    """the same for every other part (neck, projector, head)"""
    backbone_wd_mult: float = Field(1.0, ge=0.0)
    """the backbone's weight decay is `weight_decay` times this"""
    head_wd_mult: float = Field(1.0, ge=0.0)
    """the same for every other part"""

    @model_validator(mode="after")
    def _sgd_nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("train.optimizer.nesterov needs a momentum above 0")
        return self


class SchedulerConfig(Section):
    """The learning rate as a pure function of the optimizer step (engine/optim.py: lr_at)."""

    name: Literal["none", "linear", "cosine", "onecycle", "multistep"] = "cosine"
    """the learning rate as a pure function of the step: a warm-up, then `none` (constant),
    `linear` or `cosine` decay to `min_lr_ratio x lr`, `onecycle` (a half-cosine rise over
    the warm-up, then cosine decay) or `multistep` (x `gamma` at each of `milestones`)"""
    warmup_steps: int | None = Field(None, ge=0)
    """warm-up length in optimizer steps (linear; onecycle's is a half-cosine); `null` = 3
    epochs, at most a tenth of the run (onecycle: 30 % of the run, torch's `pct_start`)"""
    warmup_init: float = Field(0.0, ge=0.0, le=1.0)
    """the warm-up starts from `warmup_init x lr`"""
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """final learning rate of `linear`, `cosine` and `onecycle`, as a fraction of the peak"""
    milestones: list[int] = []
    """`multistep`: increasing optimizer steps (0-based) from which the rate is multiplied by
    `gamma` once more; required by it"""
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    """`multistep`: the factor at each milestone"""

    @model_validator(mode="after")
    def _milestones_increase(self) -> SchedulerConfig:
        if self.name == "multistep" and not self.milestones:
            raise ValueError("train.scheduler.milestones is required by the multistep schedule (e.g. [800, 1100])")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or any(m < 1 for m in self.milestones):
            raise ValueError(f"train.scheduler.milestones must be increasing step numbers >= 1, got {self.milestones}")
        return self


class EMAConfig(Section):
    enabled: bool = True
    """keep an EMA of the weights, used for validation, `best.pt` weights and export"""
    decay: float | None = Field(None, gt=0.0, lt=1.0)
    """EMA decay; the effective decay ramps up as `decay x (1 - exp(-updates / warmup_steps))`.
    `null` = `1 - 5 / total_steps`, at most 0.9998: the EMA averages about the last fifth of
    the run, whatever its length (engine/ema.py)"""
    warmup_steps: int | None = Field(None, ge=1)
    """EMA ramp length, so that a short run's EMA tracks the model instead of lagging behind
    its init; `null` = a tenth of the run"""
    average_buffers: bool = False
    """average the BatchNorm running statistics with the weights (as Ultralytics does)
    instead of copying the model's: steadier runs of 50+ epochs, worse short ones (see
    [recipe.md](recipe.md)); with `train.recalibrate_bn.enabled`, validations and the
    checkpoints after them use recalibrated statistics instead"""
    eval: bool = True
    """validate, pick `best.pt`, evaluate, export and predict with the EMA weights; `false`:
    with the raw weights (the EMA is still kept and checkpointed, so a resume stays exact)"""


class BNRecalibrationConfig(Section):
    enabled: bool = False
    """before every validation, recompute the evaluated (EMA) model's BatchNorm statistics on
    training images (engine/recalibrate.py) and save them with it in the checkpoint, instead
    of the statistics gathered in training (from the raw model, which the EMA weights lag).
    Off: it lifted a 61-epoch raccoon run but lowered the 36-epoch ones (see
    [recipe.md](recipe.md))"""
    images: int = Field(256, ge=1)
    """training images used for it, spread evenly over the split (all of a smaller split)"""
    transform: Literal["val", "train"] = "val"
    """`val`: those images plainly letterboxed, as validation sees them; `train`: as the epoch
    just trained augmented them (mosaic while it is on)"""


# The validation metrics a run can be steered by (evaluation/coco.py: HEADLINE_KEYS).
ValMetric = Literal["map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
                    "ar1", "ar10", "ar_max", "ar_small", "ar_medium", "ar_large"]


class EarlyStopConfig(Section):
    patience: int | None = Field(None, ge=1)
    """end the run after this many validations in a row without improvement (its checkpoint
    is written first); `null` = off. `train_report.json` and `status.json` say why a run
    ended (`end_reason`: `steps_done` or `early_stop`), and resuming a stopped run trains
    nothing more"""
    min_delta: float = Field(0.0, ge=0.0)
    """a validation improves when it beats the best so far by more than this"""
    metric: ValMetric = "map50_95"
    """the validation metric watched (higher is better)"""


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1)
    """also write `last.pt` every N optimizer steps (mid-epoch). A write costs about one
    training step of the quickstart model ([benchmarks.md](benchmarks.md)), so N = 50
    spends about 2 % of the time on checkpoints"""
    every_epochs: int | None = Field(1, ge=1)
    """write `last.pt` every N epochs; the end of training always writes it"""
    best_metric: ValMetric = "map50_95"
    """the validation metric that chooses `best.pt` (recorded in it, and checked by `runs
    verify`)"""
    best_mode: Literal["max", "min"] = "max"
    """whether the highest (`max`) or the lowest (`min`) value of `best_metric` is best"""
    keep_epochs: int = Field(0, ge=0)
    """also keep a snapshot `checkpoints/epoch_NNNN.pt` at the end of every epoch, the last N
    of them (older ones are deleted as new ones come; listed in the manifest; `last.pt` and
    `best.pt` are never touched). 0 = none"""


class NonFiniteConfig(Section):
    policy: Literal["skip", "abort"] = "skip"
    """`skip`: a step whose loss or gradients are not finite is skipped and counted, and
    `max_consecutive` of them in a row abort the run; `abort`: the first one aborts it (exit
    status 3; the last good checkpoint stays in place either way)"""
    max_consecutive: int = Field(5, ge=1)
    """with `policy: skip`, this many non-finite steps in a row abort the run (exit status 3)"""


class StageConfig(Section):
    steps: int = Field(ge=1)
    """optimizer steps in this stage"""
    freeze: list[str] = []
    """module prefixes not trained during the stage (e.g. `backbone`, `backbone.stage1`)"""
    lr_mult: float = Field(1.0, gt=0.0)
    """the schedule's learning rate is multiplied by this during the stage"""


class DDPConfig(Section):
    sync_bn: bool = False
    """under torchrun: BatchNorm layers normalise over the global batch (torch's
    SyncBatchNorm; CUDA only) instead of each process's share of it"""
    timeout_s: float = Field(1800.0, gt=0.0)
    """seconds a process waits for the others in a collective (a gradient all-reduce, the
    meeting at a checkpoint or a validation) before the run fails naming the rank that did
    not arrive: longer than rank 0's slowest validation or checkpoint write"""


class LoRAConfig(Section):
    """Low-rank adapters (models/lora.py): `W x + (alpha / r) B A x` on chosen layers, A [r, in]
    and B [out, r] trained, B starting at zero so that training starts from the base model."""

    r: int = Field(0, ge=0)
    """adapter rank; `0` = no adapters (off), above 0 adapts the `target` layers"""
    alpha: float | None = Field(None, gt=0.0)
    """the adapters' output is scaled by `alpha / r`; `null` = `r` (a scale of 1)"""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """dropout on the adapters' input in training (the base path never sees it)"""
    target: Literal["head", "all_linear", "all_conv1x1", "all_linear_conv1x1"] = "head"
    """the layers adapted: `head` = every Linear and 1x1 Conv2d of the model's head; `all_linear`
    = every Linear; `all_conv1x1` = every ungrouped 1x1 Conv2d; `all_linear_conv1x1` = both.
    Linear layers inside `nn.MultiheadAttention` are left out (it reads their weights without
    calling them)"""
    freeze_base: bool = True
    """train only the adapters (and the biases per `train_bias`); `false`: the base weights
    train too"""
    train_bias: Literal["none", "all"] = "none"
    """with `freeze_base`: `all` also trains every bias of the model (convolutions, linears,
    norms, attention projections), `none` keeps them fixed"""


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    """training length in epochs (with the nominal batch of 64 and a batch of 16, an
    optimizer step per 4 batches)"""
    max_steps: int | None = Field(None, ge=1)
    """training length in optimizer steps; the run ends at whichever of `epochs` and
    `max_steps` comes first"""
    time_budget: float | None = Field(None, gt=0.0)
    """a wall-clock budget in hours (as Ultralytics' `time`; 0.5 = 30 minutes) that sets the
    run's length instead of `epochs`: before training, a few steps and validation batches
    are timed and the step count that fits is planned (at most `max_steps`). The plan is
    in `train_report.json` (`plan.time_budget`) and in the checkpoints, and a resume keeps
    it, so the run stays exact. `null` = off"""
    batch_size: int = Field(16, ge=1)
    """images per micro-batch, per process under torchrun (the global batch is this times the
    number of processes)"""
    nominal_batch: int | None = Field(64, ge=1)
    """images per optimizer step whatever the batch size: the gradients of
    `round(nominal_batch / global batch)` batches are accumulated (YOLO's nominal batch), so
    that a smaller batch or more processes do not change the recipe. The last step of an epoch takes the
    batches left, so every image is used. `null` = a step every `accumulate` batches"""
    drop_last: bool = True
    """drop the last batch of an epoch when the split does not fill it (`false`: train it,
    smaller); with several processes the few images that cannot give each process one are
    left out of the epoch either way"""
    accumulate: int = Field(1, ge=1)
    """a fixed number of batches per optimizer step; a value above 1 without `nominal_batch`
    turns `nominal_batch` off, both set is an error"""
    optimizer: OptimizerConfig = OptimizerConfig()
    """the optimizer and its parameter groups"""
    scheduler: SchedulerConfig = SchedulerConfig()
    """the learning rate schedule (engine/optim.py: `lr_at`)"""
    loss_box_warmup_epochs: float = Field(0.0, ge=0.0)
    """over this many epochs the box-loss weight multiplier ramps linearly from
    `loss_box_scale_start` to `loss_box_scale_end` (box components: `loss_box`, `loss_dfl`,
    `loss_l1`, `loss_giou`); 0 = `loss_box_scale_end` throughout"""
    loss_box_scale_start: float = Field(1.0, ge=0.0)
    """the box-loss multiplier at the start of the ramp"""
    loss_box_scale_end: float = Field(1.0, ge=0.0)
    """the box-loss multiplier after the ramp (logged per step as `box_scale`)"""
    loss_component_clip: float | None = Field(None, gt=0.0)
    """each raw loss component above this is scaled down to it (its gradient keeps its
    direction), so that one exploding term cannot swamp a step; `null` = off"""
    task_aligner: Literal["none", "uncertainty"] = "none"
    """`uncertainty`: learned per-component weights (Kendall et al., 2018): the loss is
    sum exp(-s_i) w_i L_i + s_i with one learned s_i per component, trained with the model
    (no weight decay, in the optimizer group `task_aligner`), checkpointed, and logged per
    step as `task_weight/<component>`"""
    grad_clip: float | None = Field(10.0, gt=0.0)
    """max gradient norm (`null` = no clipping; the norm is still logged)"""
    ema: EMAConfig = EMAConfig()
    """the exponential moving average of the weights (engine/ema.py)"""
    recalibrate_bn: BNRecalibrationConfig = BNRecalibrationConfig()
    """BatchNorm statistics recomputed before validation (engine/recalibrate.py)"""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """how often `last.pt` is written"""
    nonfinite: NonFiniteConfig = NonFiniteConfig()
    """what a step with a non-finite loss or gradient does"""
    early_stop: EarlyStopConfig = EarlyStopConfig()
    """ending the run when validation stops improving"""
    stages: list[StageConfig] = []
    """training stages, in order: `{steps, freeze, lr_mult}` each (e.g. `[{steps: 500, freeze:
    [backbone]}]` trains the rest only for 500 steps, then everything). After the last
    stage everything trains at the schedule's rate; the active stage is in each step's
    metrics line (`stage`) and a resume inside any stage is exact"""
    ddp: DDPConfig = DDPConfig()
    """several training processes (torchrun)"""
    quant: Literal["none", "int8wo", "int4wo"] = "none"
    """a quantised, frozen base (models/quant.py; needs `pip install 'detpact[adapt]'`): the
    Linear layers' weights (outside attention's out-projection) are quantised by torchao and
    frozen, the rest trains in float. `int8wo`: int8 weight-only, runs on CPU and CUDA;
    `int4wo`: int4 weight-only, CUDA only. The dense detectors have no Linear layer (all
    convolutions); the rtdetr head and ConvNeXt backbones do. Checkpoints keep the float base
    (plain tensors), re-quantised on resume; eval, predict and export use the quantised
    weights' float values. What was applied is recorded under `weights.quant` in
    `train_report.json` (see [adaptation.md](adaptation.md))"""
    quant_required: bool = False
    """when `quant` cannot be applied here (`int4wo` off CUDA, or no Linear layer), refuse to
    train (`true`) instead of training unquantised with a warning recorded in
    `train_report.json` (`false`)"""
    lora: LoRAConfig = LoRAConfig()
    """low-rank adapters for fine-tuning (see [adaptation.md](adaptation.md)); export,
    `detpact eval` and `detpact lora merge` fold them into the base weights. With `quant`,
    the adapters sit over the quantised base (its Linear layers)"""
    qlora: bool = False
    """QLoRA: LoRA adapters (`lora`, `r` > 0, `freeze_base`) over an `int4wo` base; sets
    `quant: int4wo`. Off CUDA the base cannot be int4 and follows `quant_required` (refused,
    or the adapters train over the float base with the warning recorded)"""
    continual: ContinualConfig = ContinualConfig()
    """regularisers against forgetting a previous task (docs/adaptation.md); all off by default"""

    @model_validator(mode="after")
    def _qlora_is_lora_over_int4(self) -> TrainConfig:
        if not self.qlora:
            return self
        if not self.lora.r:
            raise ValueError("train.qlora needs adapters: set train.lora.r above 0 (e.g. 8)")
        if not self.lora.freeze_base:
            raise ValueError("train.qlora trains only the adapters over a frozen int4 base: train.lora.freeze_base "
                             "must stay true")
        if self.quant == "int8wo":
            raise ValueError("train.qlora means an int4wo base; for LoRA over an int8 base set train.quant: int8wo "
                             "and train.qlora: false")
        self.quant = "int4wo"
        return self

    @model_validator(mode="after")
    def _one_way_to_accumulate(self) -> TrainConfig:
        if self.accumulate != 1 and "nominal_batch" not in self.model_fields_set:
            self.nominal_batch = None  # a fixed accumulation asked for: the nominal batch steps aside
        if self.nominal_batch is not None and self.accumulate != 1:
            raise ValueError("set train.accumulate or train.nominal_batch, not both "
                             "(train.nominal_batch: null to accumulate a fixed number of batches)")
        return self
