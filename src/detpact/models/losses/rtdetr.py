"""The set criterion of the rtdetr head (RT-DETR's RTDETRCriterionv2, varifocal + L1 + GIoU).

Every prediction set of a `DetrOutput` is supervised the same way: each decoder layer
(the last one, and the others when aux_loss is on), the encoder's top-Q proposals, and
per decoder layer the denoising queries. Matching sets are paired with the ground
truth by the Hungarian matcher; denoising queries know their box by construction
(`DenoisingGroups`). Then, per set:

- varifocal classification: a matched query's target at its box's class is the IoU of
  its predicted box with that box (detached), so the score ranks by localisation
  quality; negatives weigh alpha * p^gamma, so confident false positives dominate;
- L1 on normalised cxcywh and 1 - GIoU on the matched pairs.

Each set's losses are divided by the batch's box count (times the number of
denoising groups for the denoising sets, which repeat every box once per group), and
the sets are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detpact.config import RTDETRConfig, SetLossConfig
from detpact.models.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, paired_giou, paired_iou
from detpact.models.losses.normalise import Normaliser, local_normaliser
from detpact.models.losses.terms import LossTerms, WeightedTerm, weighted_sum
from detpact.models.matching import HungarianMatcher, build_matcher
from detpact.models.outputs import DetrOutput

Indices = list[tuple[Tensor, Tensor]]  # per image (query_idx [K_i], target_idx [K_i])


def normalise_targets(targets: list[dict[str, Tensor]], image_size: tuple[int, int],
                      device: torch.device) -> list[dict[str, Tensor]]:
    """Pixel xyxy targets -> the heads' box format, on `device`.

    targets: B dicts with "boxes" [N_i, 4] xyxy in input-image pixels and "labels" [N_i] int64.
    image_size: (H, W) of the input images.
    Returns B dicts with "boxes" [N_i, 4] float32 cxcywh normalised by (W, H) and "labels" [N_i].
    """
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    return [{"labels": t["labels"].to(device),
             "boxes": box_xyxy_to_cxcywh(t["boxes"].to(device, torch.float32)) / scale} for t in targets]


class SetCriterion:
    """`criterion(outputs: DetrOutput, targets) -> dict[str, Tensor]` with keys

    "loss":      the weighted total (differentiable), equal to
                 vfl_weight * loss_vfl + l1_weight * loss_l1 + giou_weight * loss_giou;
    "loss_vfl", "loss_l1", "loss_giou": each summed over all prediction sets (detached);
    "num_pos":   matched pairs of the last decoder layer (detached).

    `with_terms` also returns the weighted terms of "loss", differentiable, for a balancer.
    targets: B dicts with "boxes" [N_i, 4] xyxy pixels and "labels" [N_i] int64, on any device.
    Computed in float32 (the outputs are cast), to be called outside autocast. The class
    count comes from the logits.
    """

    def __init__(self, matcher: HungarianMatcher, cfg: SetLossConfig, normaliser: Normaliser = local_normaliser):
        self.matcher = matcher
        self.cfg = cfg
        self.normaliser = normaliser

    @property
    def components(self) -> tuple[str, ...]:
        """The names of the terms, known before the first batch (a task aligner needs them)."""
        return ("loss_vfl", "loss_l1", "loss_giou")

    def __call__(self, outputs: DetrOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.with_terms(outputs, targets)[0]

    def with_terms(self, outputs: DetrOutput, targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], LossTerms]:
        """The criterion's dict, and the terms its "loss" sums: component -> (weight, value)."""
        if not outputs.layers:
            raise ValueError("SetCriterion needs DetrOutput.layers: the rtdetr head gives at least its last layer")
        device = outputs.cls_logits.device
        targets = normalise_targets(targets, outputs.image_size, device)
        # Counted on the host (a CPU scalar divides device tensors without a sync).
        num_boxes = self.normaliser(torch.tensor(float(sum(len(t["labels"]) for t in targets))))

        # (set, fixed indices or None to match, normaliser)
        sets = [(prediction, None, num_boxes) for prediction in outputs.layers]
        if outputs.encoder is not None:
            sets.append((outputs.encoder, None, num_boxes))
        if outputs.denoising and outputs.dn_groups is not None:
            dn = outputs.dn_groups
            dn_indices = list(zip(dn.positive_idx, dn.target_idx))
            sets += [(prediction, dn_indices, num_boxes * dn.num_groups) for prediction in outputs.denoising]

        totals = {"loss_vfl": 0.0, "loss_l1": 0.0, "loss_giou": 0.0}
        last_layer = outputs.layers[-1]
        num_pos = 0
        for prediction, indices, norm in sets:
            logits, boxes = prediction.logits.float(), prediction.boxes.float()
            if indices is None:
                indices = self.matcher(logits, boxes, targets)
            if prediction is last_layer:
                num_pos = sum(len(query_idx) for query_idx, _ in indices)
            for key, value in self.set_losses(logits, boxes, targets, indices, norm).items():
                totals[key] = totals[key] + value

        terms = {"loss_vfl": WeightedTerm(self.cfg.vfl_weight, totals["loss_vfl"]),
                 "loss_l1": WeightedTerm(self.cfg.l1_weight, totals["loss_l1"]),
                 "loss_giou": WeightedTerm(self.cfg.giou_weight, totals["loss_giou"])}
        # (vfl + l1) + giou, left to right as always: the total is unchanged bit for bit.
        losses = {"loss": weighted_sum(terms), **{k: t.value.detach() for k, t in terms.items()},
                  "num_pos": torch.tensor(num_pos, device=device)}
        return losses, terms

    def set_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
                   norm: float) -> dict[str, Tensor]:
        """The three losses of one prediction set.

        logits: [B, Q, C] float32; boxes: [B, Q, 4] float32 normalised cxcywh.
        targets: B dicts of normalised cxcywh "boxes" [N_i, 4] and "labels" [N_i], on logits' device.
        indices: per image (query_idx [K_i], target_idx [K_i]), the pairs to supervise.
        norm: the divisor of every sum (the batch's box count, times the denoising groups).
        Returns "loss_vfl", "loss_l1", "loss_giou", scalars.
        """
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)  # [P]
        query_idx = torch.cat([q for q, _ in indices]).to(device)  # [P]
        target_idx = [j.to(device) for _, j in indices]
        gt_labels = torch.cat([t["labels"][j] for t, j in zip(targets, target_idx)])  # [P]
        gt_boxes = torch.cat([t["boxes"][j] for t, j in zip(targets, target_idx)])  # [P, 4]
        pred_boxes = boxes[batch_idx, query_idx]  # [P, 4]
        pred_xyxy, gt_xyxy = box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes)

        # Varifocal loss. target_score is the IoU at each matched query's gt class, 0 elsewhere.
        iou = paired_iou(pred_xyxy.detach(), gt_xyxy)  # [P]
        target_score = torch.zeros_like(logits)  # [B, Q, C]
        target_score[batch_idx, query_idx, gt_labels] = iou
        positive = torch.zeros_like(logits)  # [B, Q, C] one-hot of the matched classes
        positive[batch_idx, query_idx, gt_labels] = 1.0
        # Negatives weigh alpha * p^gamma (easy ones fade); positives weigh their IoU target.
        weight = self.cfg.alpha * logits.detach().sigmoid().pow(self.cfg.gamma) * (1 - positive) + target_score
        bce = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        # RT-DETR writes this as bce.mean(1).sum() * Q / norm, the same number.
        return {
            "loss_vfl": bce.sum() / norm,
            "loss_l1": F.l1_loss(pred_boxes, gt_boxes, reduction="sum") / norm,
            "loss_giou": (1 - paired_giou(pred_xyxy, gt_xyxy)).sum() / norm,
        }


def build_set_criterion(cfg: RTDETRConfig, normaliser: Normaliser = local_normaliser) -> SetCriterion:
    return SetCriterion(build_matcher(cfg.matcher), cfg.loss, normaliser)
