"""The criteria, one per head family: `criterion(outputs, targets) -> dict[str, Tensor]`.

dense.py:  `DetectionCriterion` for the dense head (quality-target classification, IoU box
           loss, DFL), with a per-location assigner.
rtdetr.py: `SetCriterion` for the rtdetr head (varifocal, L1, GIoU on every prediction
           set), with Hungarian matching.

Both return "loss" (the weighted total to back-propagate), its detached components
("loss_cls", "loss_box", "loss_dfl" or "loss_vfl", "loss_l1", "loss_giou") and "num_pos",
computed in float32 outside autocast; every value of the dict is a tensor.

`criterion.with_terms(outputs, targets) -> (that dict, terms)` also hands out what "loss"
sums (terms.py): component name -> `WeightedTerm(weight, value)`, the value differentiable,
in summation order, with "loss" == `weighted_sum(terms)` bit for bit. A loss balancer
(engine/balance.py) re-weights these; `criterion.components` names them before the first
batch.
"""

from __future__ import annotations

from detpact.config import HeadConfig
from detpact.models.losses import dense
from detpact.models.losses.dense import BOX_IOUS, DetectionCriterion, distribution_focal_loss, pad_targets
from detpact.models.losses.normalise import Normaliser, local_normaliser
from detpact.models.losses.rtdetr import SetCriterion, build_set_criterion, normalise_targets
from detpact.models.losses.terms import LossTerms, WeightedTerm, weighted_sum

Criterion = DetectionCriterion | SetCriterion


def build_criterion(cfg: HeadConfig, num_classes: int | None = None,
                    normaliser: Normaliser = local_normaliser) -> Criterion:
    """The criterion of the head `cfg.name` names. `num_classes` is accepted for symmetry with
    `build_model` but neither criterion needs it: both read the class count off the logits.
    `normaliser` turns a batch's positive (or box) count into the losses' divisor."""
    if cfg.name == "rtdetr":
        return build_set_criterion(cfg.rtdetr, normaliser)
    return dense.build_criterion(cfg, normaliser)


__all__ = [
    "BOX_IOUS", "Criterion", "DetectionCriterion", "LossTerms", "SetCriterion", "WeightedTerm", "build_criterion",
    "build_set_criterion", "distribution_focal_loss", "normalise_targets", "pad_targets", "weighted_sum",
]
