"""Loss balancing: how a criterion's weighted terms become the loss to back-propagate.

Three controls, each off by default, applied by `balanced_loss` in this order:

1. clipping (`clip_component`): each raw component above the limit is scaled down to the
   limit, its gradient direction kept. It comes first so that the limit is in the units
   of the logged "loss_xxx" components, whatever the weights or the warm-up scale.
2. box-loss warm-up (`box_loss_scale`): the configured weight of every box component
   (`BOX_COMPONENTS`) times a multiplier ramped over the first epochs, so that the box
   losses of a fresh head, large and noisy while the scores are still random, do not
   dominate the first updates.
3. task alignment (`UncertaintyWeights`): learned per-component weights in place of the
   plain sum of the weighted terms.

With every control off the result is the criterion's own "loss", bit for bit: the same
`weighted_sum` over the same terms (models/losses/terms.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detpact.config import TrainConfig
from detpact.models.losses import LossTerms, WeightedTerm, weighted_sum

# The box-regression components of both criteria, the ones the warm-up scales:
# dense (loss_box, loss_dfl) and rtdetr (loss_l1, loss_giou). Classification is left alone.
BOX_COMPONENTS = frozenset({"loss_box", "loss_dfl", "loss_l1", "loss_giou"})


def box_loss_scale(epoch_progress: float, warmup_epochs: float, start: float, end: float) -> float:
    """The box-loss multiplier after `epoch_progress` epochs of training (fractional, e.g.
    step / steps_per_epoch): linear from `start` at 0 to `end` at `warmup_epochs`, `end`
    from then on (and throughout when `warmup_epochs` <= 0). A pure function of the
    progress, so a resumed run needs only its step counter."""
    if warmup_epochs <= 0 or epoch_progress >= warmup_epochs:
        return end
    return start + (end - start) * max(epoch_progress, 0.0) / warmup_epochs


def clip_component(value: Tensor, limit: float | None) -> Tensor:
    """`value` scaled down to `limit` where it exceeds it, unchanged otherwise (None: off).

    value * (limit / value.detach()) rather than a clamp: a clamp would zero the gradient
    of a spiking component exactly when it matters most; this keeps its direction and
    scales its magnitude by limit / value. The comparison stays on the device (no sync),
    and the divisor never drops below `limit`, so nothing divides by zero.
    """
    if limit is None:
        return value
    if limit <= 0:
        raise ValueError(f"a loss clip limit must be positive, got {limit}")
    return value * (limit / value.detach().clamp(min=limit))


class UncertaintyWeights(nn.Module):
    """Task alignment by homoscedastic uncertainty (Kendall, Gal & Cipolla, CVPR 2018): the
    "uncertainty" task aligner.

    One learned log-variance s_i per component, initialised to 0, and

        total = sum_i [exp(-s_i) * w_i * L_i + s_i]

    with w_i * L_i the configured (and possibly warm-up scaled, clipped) weighted term.
    The paper's regression form is 0.5 * exp(-s) * L + 0.5 * s; the 0.5 factors are
    dropped, as common detection implementations do, so that one form serves classification
    and regression alike: it is twice the paper's, with the same optimum exp(-s_i) =
    1 / (w_i * L_i) (each weighted term is pulled towards 1) and gradients twice as large.
    At s = 0 the total is the plain weighted sum, so training starts from the configured
    balance. The +s_i keeps a weight from collapsing to 0.

    An nn.Module, so that its parameters go into the optimizer (without weight decay, which
    would pull every s_i back to 0) and its state_dict ("log_vars.<component>") into the
    checkpoint.
    """

    def __init__(self, components: Sequence[str]):
        super().__init__()
        if not components:
            raise ValueError("UncertaintyWeights needs at least one loss component")
        self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in components})

    def forward(self, weighted: Mapping[str, Tensor]) -> Tensor:
        """weighted: component -> w_i * L_i (scalars). Returns the aligned total, summed in
        the mapping's order."""
        if not weighted:
            raise ValueError("UncertaintyWeights needs at least one weighted term")
        unknown = set(weighted) - set(self.log_vars)
        if unknown:
            raise ValueError(f"UncertaintyWeights has no log-variance for {sorted(unknown)}; "
                             f"it was built for {list(self.log_vars)} (pass the criterion's .components)")
        aligned = [torch.exp(-self.log_vars[name]) * term + self.log_vars[name] for name, term in weighted.items()]
        total = aligned[0]
        for term in aligned[1:]:
            total = total + term
        return total

    def weights(self) -> dict[str, float]:
        """The current effective multipliers exp(-s_i) per component, for logging."""
        return {name: float(torch.exp(-s.detach())) for name, s in self.log_vars.items()}


TASK_ALIGNERS = {"uncertainty": UncertaintyWeights}


def build_task_aligner(name: str | None, components: Sequence[str]) -> UncertaintyWeights | None:
    """The task aligner `name` names (None or "none": the plain weighted sum) for the
    criterion components `components` (`criterion.components`)."""
    if name is None or name == "none":
        return None
    if name not in TASK_ALIGNERS:
        raise ValueError(f"unknown task aligner {name!r}; choices: none, {', '.join(TASK_ALIGNERS)}")
    return TASK_ALIGNERS[name](components)


def balanced_loss(terms: LossTerms, *, box_scale: float, clip: float | None,
                  aligner: UncertaintyWeights | None) -> tuple[Tensor, dict[str, float]]:
    """The loss to back-propagate from a criterion's terms (`criterion.with_terms`).

    Per component, in the terms' order: clip the raw value to `clip` (None: off), multiply
    the configured weight by `box_scale` for the box components (`BOX_COMPONENTS`), then
    sum the weighted terms, plainly (`aligner` None) or through the task aligner.
    box_scale 1, clip None and aligner None give the criterion's "loss" bit for bit.

    Returns (total, logged): "box_scale"; with clipping, "clipped/<component>" 1.0 where
    the raw component exceeded the limit this batch, else 0.0; with an aligner,
    "task_weight/<component>" its exp(-s_i). (No key starts with "loss_": those are the
    criterion's components.)
    """
    logged: dict[str, float] = {"box_scale": float(box_scale)}
    balanced: dict[str, WeightedTerm] = {}
    for name, (weight, value) in terms.items():
        if clip is not None:
            logged[f"clipped/{name}"] = float(value.detach() > clip)
        # weight * 1.0 == weight exactly, so the all-off path keeps the criterion's weights.
        balanced[name] = WeightedTerm(weight * box_scale if name in BOX_COMPONENTS else weight,
                                      clip_component(value, clip))
    if aligner is None:
        return weighted_sum(balanced), logged
    total = aligner({name: weight * value for name, (weight, value) in balanced.items()})
    logged.update({f"task_weight/{name}": w for name, w in aligner.weights().items() if name in terms})
    return total, logged


@dataclass
class LossBalance:
    """A run's loss-balancing controls (train.loss_box_*, train.loss_component_clip,
    train.task_aligner): what `train_step` applies to each micro-batch's terms."""

    warmup_epochs: float
    scale_start: float
    scale_end: float
    clip: float | None
    aligner: UncertaintyWeights | None
    steps_per_epoch: int

    def total(self, terms: LossTerms, step: int) -> tuple[Tensor, dict[str, float]]:
        """The loss to back-propagate in optimizer step `step` (1-based) and what to log."""
        scale = box_loss_scale((step - 1) / self.steps_per_epoch, self.warmup_epochs, self.scale_start,
                               self.scale_end)
        return balanced_loss(terms, box_scale=scale, clip=self.clip, aligner=self.aligner)


def build_loss_balance(tcfg: TrainConfig, components: Sequence[str], steps_per_epoch: int,
                       device: torch.device) -> LossBalance | None:
    """The run's LossBalance, or None when every control is off (the criterion's own loss
    is back-propagated, unchanged)."""
    ramp = tcfg.loss_box_warmup_epochs > 0 and tcfg.loss_box_scale_start != tcfg.loss_box_scale_end
    constant = tcfg.loss_box_scale_end != 1.0
    aligner = build_task_aligner(tcfg.task_aligner, components)
    if not (ramp or constant or tcfg.loss_component_clip is not None or aligner is not None):
        return None
    return LossBalance(tcfg.loss_box_warmup_epochs, tcfg.loss_box_scale_start, tcfg.loss_box_scale_end,
                       tcfg.loss_component_clip, aligner.to(device) if aligner is not None else None,
                       steps_per_epoch)
