"""`train.continual:` regularisers that keep what a previous task taught (engine/penalties/)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from detpact.config.section import Section


class SelfDistillConfig(Section):
    teacher: str | None = None
    """a detpact checkpoint (e.g. the previous task's `runs/A/checkpoints/best.pt`) whose
    inference weights, loaded weights-only and run in eval mode without gradients on every
    training batch, the model is distilled from; `null` = off"""
    weight: float = Field(1.0, ge=0.0)
    """the distillation loss's weight (logged weighted as `loss_distill`)"""
    temperature: float = Field(2.0, gt=0.0)
    """logits are divided by this before the per-class sigmoids are compared; the loss is
    multiplied by its square (Hinton et al.)"""
    kl: Literal["forward", "reverse", "sym"] = "forward"
    """`forward`: KL(teacher || student) of each class's Bernoulli; `reverse`: KL(student ||
    teacher); `sym`: the mean of the two"""
    keys: list[Literal["logits", "bbox"]] = Field(["logits", "bbox"], min_length=1)
    """what is distilled: `logits` (the KL above, averaged over locations and classes) and
    `bbox` (L1 between the boxes, in fractions of the image size, averaged)"""


class DerppConfig(Section):
    alpha: float = Field(0.0, ge=0.0)
    """DER++'s logit term: alpha x the mean squared error between the model's class logits
    on replayed samples and the logits stored when they entered the buffer (`loss_derpp_logits`)"""
    beta: float = Field(0.0, ge=0.0)
    """DER++'s label term: beta x the detection loss on the replayed samples' boxes
    (`loss_derpp_labels`); the penalty is on when alpha or beta is above 0"""
    buffer_size: int = Field(0, ge=0)
    """samples the reservoir buffer holds (each: the image, its boxes, and its logits as
    the model gave them when it was added; a 640 px dense-head image with 80 classes is
    about 4 MB). Filled during training whenever above 0, so that `save_state` can hand
    it to the next task; it continues from `continual.previous`'s buffer"""
    replay_batch: int = Field(8, ge=1)
    """replayed samples per micro-batch (one extra forward pass serves both terms)"""


class EWCConfig(Section):
    weight: float = Field(0.0, ge=0.0)
    """EWC's lambda: the loss is lambda / 2 x sum F (theta - theta*)^2 over the
    parameters, F and theta* from `continual.previous` (`loss_ewc`); 0 = off"""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """online EWC: the Fisher this run saves is gamma x the previous one + its own"""
    fisher_batches: int = Field(8, ge=1)
    """training batches (letterboxed, unaugmented) the empirical Fisher (the squared
    gradient of the detection loss, batch by batch) is averaged over, at the end of a run
    with `save_state`"""


class SIConfig(Section):
    c: float = Field(0.0, ge=0.0)
    """Synaptic Intelligence's strength: the loss is c x sum Omega (theta - theta*)^2,
    Omega and theta* from `continual.previous` (`loss_si`); 0 = off"""
    epsilon: float = Field(1e-3, gt=0.0)
    """damping: a run's importance is omega / (delta^2 + epsilon), omega the path integral
    of -grad x step accumulated while it trains, delta its parameters' total change"""


class ContinualConfig(Section):
    """Penalties against forgetting, added to the criterion's loss (engine/penalties/)."""

    previous: str | None = None
    """the previous task's `checkpoints/continual.pt` (written by its run with `save_state`):
    the Fisher and SI importance with their anchor weights, and the DER++ buffer. Required
    by `ewc`, `si` and `derpp` when they are on"""
    save_state: bool = False
    """at the end of the run, write `checkpoints/continual.pt` for the next task: the
    Fisher (`ewc.fisher_batches`), the SI importance (tracked while training), the DER++
    buffer (when `derpp.buffer_size` > 0), and the weights of its `best.pt` (as evaluated) as
    their anchor: start the next task from that `best.pt`"""
    self_distill: SelfDistillConfig = SelfDistillConfig()
    """distillation from a teacher checkpoint (engine/penalties/distill.py)"""
    derpp: DerppConfig = DerppConfig()
    """Dark Experience Replay++ (engine/penalties/derpp.py)"""
    ewc: EWCConfig = EWCConfig()
    """Elastic Weight Consolidation (engine/penalties/ewc.py)"""
    si: SIConfig = SIConfig()
    """Synaptic Intelligence (engine/penalties/si.py)"""
