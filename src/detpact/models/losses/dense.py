"""The detection criterion: quality-target classification loss + IoU box loss (+ DFL).

The classification target of a positive location is a localisation quality, so scores
rank detections by how well they are placed and no centre-ness branch is needed:

- with centre sampling, the IoU of the predicted box with its ground truth
  (Varifocal / Quality-Focal style), every positive weighing 1;
- with task-aligned assignment, the assigner's normalised alignment (YOLOv8/11), which
  also weighs each positive's box losses, and their sum normalises all the losses.

With `reg_max > 1` the box sides are distributions, trained towards the two bins that
bracket the true distance by distribution focal loss (Li et al., GFL, 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detpact.config import HeadConfig, LossConfig
from detpact.models.boxes import paired_ciou, paired_giou, paired_iou
from detpact.models.losses.normalise import Normaliser, local_normaliser
from detpact.models.losses.terms import LossTerms, WeightedTerm, weighted_sum
from detpact.models.matching import Assigner, build_assigner
from detpact.models.outputs import DetectorOutput

BOX_IOUS = {"giou": paired_giou, "ciou": paired_ciou}


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets into padded tensors.

    targets: list of B dicts with "boxes" [N_i, 4] xyxy pixels and "labels" [N_i] int64.
    Returns boxes [B, G, 4] float32, labels [B, G] int64, valid [B, G] bool (G = max N_i).
    """
    batch = len(targets)
    num_gt = max((len(t["labels"]) for t in targets), default=0)
    boxes = torch.zeros(batch, num_gt, 4, device=device)
    labels = torch.zeros(batch, num_gt, dtype=torch.long, device=device)
    valid = torch.zeros(batch, num_gt, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"].to(device, torch.float32)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
    return boxes, labels, valid


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL of side distributions: logits [P, 4, R], target distances [P, 4] in bins -> [P].

    The target t lies between bins floor(t) and floor(t) + 1; the loss is their
    cross-entropies weighted by closeness, so the expectation is pulled onto t.
    """
    bins = logits.shape[-1]
    target = target.clamp(0, bins - 1 - 0.01)
    left = target.floor().long()
    w_left = left + 1 - target
    log_p = logits.log_softmax(dim=-1)
    nll_left = -log_p.gather(-1, left[..., None])[..., 0]
    nll_right = -log_p.gather(-1, (left + 1)[..., None])[..., 0]
    return (nll_left * w_left + nll_right * (1 - w_left)).mean(dim=-1)


class DetectionCriterion:
    """`criterion(outputs, targets) -> dict[str, Tensor]` with "loss", "loss_cls", "loss_box"
    and, for a distribution head, "loss_dfl".

    "loss" = cls_weight * loss_cls + box_weight * loss_box (+ dfl_weight * loss_dfl), the
    components detached. Computed in float32 (outputs are cast), outside autocast, so
    bf16/fp16 training does not lose precision in the loss. Also reports "num_pos" (detached).
    `with_terms` also returns the weighted terms of "loss", differentiable, for a balancer.
    """

    def __init__(self, assigner: Assigner, cfg: LossConfig, reg_max: int = 1,
                 normaliser: Normaliser = local_normaliser):
        self.assigner = assigner
        self.cfg = cfg
        self.normaliser = normaliser
        self.box_iou = BOX_IOUS[cfg.iou]
        self.reg_max = reg_max

    @property
    def components(self) -> tuple[str, ...]:
        """The names of the terms, known before the first batch (a task aligner needs them
        to create its parameters): DFL only with distribution box sides."""
        return ("loss_cls", "loss_box", "loss_dfl") if self.reg_max > 1 else ("loss_cls", "loss_box")

    def __call__(self, outputs: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.with_terms(outputs, targets)[0]

    def with_terms(self, outputs: DetectorOutput, targets: list[dict[str, Tensor]]
                   ) -> tuple[dict[str, Tensor], LossTerms]:
        """The criterion's dict, and the terms its "loss" sums: component -> (weight, value)."""
        logits = outputs.cls_logits.float()  # [B, A, C]
        pred_boxes = outputs.boxes.float()  # [B, A, 4]
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, logits.device)
        assignment = self.assigner(outputs, gt_boxes, gt_labels, gt_valid)
        pos = assignment.matched >= 0  # [B, A]
        num_pos = pos.sum()

        b_idx, a_idx = pos.nonzero(as_tuple=True)
        g_idx = assignment.matched[b_idx, a_idx]
        pos_pred = pred_boxes[b_idx, a_idx]  # [P, 4]
        pos_gt = gt_boxes[b_idx, g_idx]  # [P, 4]

        if assignment.quality is None:  # centre sampling: the IoU is the target, each positive counts 1
            quality = paired_iou(pos_pred.detach(), pos_gt).clamp(min=0.0)
            weight = torch.ones_like(quality)
            # Normalising by the positive count keeps the loss scale independent of how
            # many objects a batch holds; max(1) covers images without any.
            norm = self.normaliser(num_pos.float())
        else:
            quality = weight = assignment.quality[b_idx, a_idx]
            norm = self.normaliser(quality.sum())
        target = torch.zeros_like(logits)
        target[b_idx, a_idx, gt_labels[b_idx, g_idx]] = quality

        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.cfg.quality_gamma > 0:
            # Down-weight locations whose score is already close to its target.
            bce = bce * (logits.sigmoid() - target).abs().pow(self.cfg.quality_gamma)
        terms = {
            "loss_cls": WeightedTerm(self.cfg.cls_weight, bce.sum() / norm),
            "loss_box": WeightedTerm(self.cfg.box_weight,
                                     ((1.0 - self.box_iou(pos_pred, pos_gt)) * weight).sum() / norm),
        }
        if outputs.box_logits is not None:
            points, strides = outputs.points[a_idx], outputs.strides[a_idx, None]  # [P, 2], [P, 1]
            sides = torch.cat([points - pos_gt[:, :2], pos_gt[:, 2:] - points], dim=-1) / strides  # [P, 4] in bins
            dfl = distribution_focal_loss(outputs.box_logits[b_idx, a_idx].float(), sides)
            terms["loss_dfl"] = WeightedTerm(self.cfg.dfl_weight, (dfl * weight).sum() / norm)
        # (cls + box) + dfl, left to right as always: the total is unchanged bit for bit.
        losses = {"loss": weighted_sum(terms), **{k: t.value.detach() for k, t in terms.items()},
                  "num_pos": num_pos.detach()}
        return losses, terms


def build_criterion(cfg: HeadConfig, normaliser: Normaliser = local_normaliser) -> DetectionCriterion:
    return DetectionCriterion(build_assigner(cfg.assigner), cfg.loss, cfg.reg_max, normaliser)
