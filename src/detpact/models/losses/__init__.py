"""The criteria, one per head family: `criterion(outputs, targets) -> dict[str, Tensor]`.

dense.py:  `DetectionCriterion` for the dense head (quality-target classification, IoU box
           loss, DFL), with a per-location assigner.
rtdetr.py: `SetCriterion` for the rtdetr head (varifocal, L1, GIoU on every prediction
           set), with Hungarian matching.

Both return "loss" (the weighted total to back-propagate), its detached components
and "num_pos", computed in float32 outside autocast.
"""

from __future__ import annotations

from detpact.config import HeadConfig
from detpact.models.losses import dense
from detpact.models.losses.dense import BOX_IOUS, DetectionCriterion, distribution_focal_loss, pad_targets
from detpact.models.losses.normalise import Normaliser, local_normaliser
from detpact.models.losses.rtdetr import SetCriterion, build_set_criterion, normalise_targets

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
    "BOX_IOUS", "Criterion", "DetectionCriterion", "SetCriterion", "build_criterion", "build_set_criterion",
    "distribution_focal_loss", "normalise_targets", "pad_targets",
]
