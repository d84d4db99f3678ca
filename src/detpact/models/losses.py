"""The detection criterion: IoU-quality classification loss + GIoU box loss.

The classification target of a positive location is the IoU between its predicted
box and its assigned ground truth (Varifocal / Quality-Focal style), so scores rank
detections by localisation quality and no separate centre-ness branch is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detpact.config import HeadConfig
from detpact.models.boxes import paired_giou, paired_iou
from detpact.models.heads.dense import DetectorOutput
from detpact.models.matching import CenterSamplingAssigner, build_assigner


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


class DetectionCriterion:
    """`criterion(outputs, targets) -> dict[str, Tensor]` with "loss", "loss_cls", "loss_box".

    Computed in float32 (outputs are cast), outside autocast, so bf16/fp16 training
    does not lose precision in the loss. Also reports "num_pos" (detached).
    """

    def __init__(self, assigner: CenterSamplingAssigner, cls_weight: float, box_weight: float, quality_gamma: float):
        self.assigner = assigner
        self.cls_weight = cls_weight
        self.box_weight = box_weight
        self.quality_gamma = quality_gamma

    def __call__(self, outputs: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        logits = outputs.cls_logits.float()  # [B, A, C]
        pred_boxes = outputs.boxes.float()  # [B, A, 4]
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, logits.device)
        matched = self.assigner(outputs.points, outputs.strides, gt_boxes, gt_valid)  # [B, A]
        pos = matched >= 0
        num_pos = pos.sum()
        # Normalising by the positive count keeps the loss scale independent of how
        # many objects a batch holds; max(1) covers images without any.
        norm = num_pos.clamp(min=1).float()

        b_idx, a_idx = pos.nonzero(as_tuple=True)
        g_idx = matched[b_idx, a_idx]
        pos_pred = pred_boxes[b_idx, a_idx]  # [P, 4]
        pos_gt = gt_boxes[b_idx, g_idx]  # [P, 4]

        target = torch.zeros_like(logits)
        iou = paired_iou(pos_pred.detach(), pos_gt).clamp(min=0.0)
        target[b_idx, a_idx, gt_labels[b_idx, g_idx]] = iou

        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.quality_gamma > 0:
            # Down-weight locations whose score is already close to its target.
            bce = bce * (logits.sigmoid() - target).abs().pow(self.quality_gamma)
        loss_cls = bce.sum() / norm
        loss_box = (1.0 - paired_giou(pos_pred, pos_gt)).sum() / norm
        loss = self.cls_weight * loss_cls + self.box_weight * loss_box
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(), "num_pos": num_pos.detach()}


def build_criterion(cfg: HeadConfig) -> DetectionCriterion:
    return DetectionCriterion(
        build_assigner(cfg.assigner), cfg.loss.cls_weight, cfg.loss.box_weight, cfg.loss.quality_gamma
    )
