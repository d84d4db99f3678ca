"""Turn a detector's output into final detections.

Dense heads predict each object from many overlapping locations: score threshold,
top-k, per-class NMS. NMS-free heads (rtdetr: one query per object, learnt by
one-to-one matching) need only the score threshold and the top `max_det` of their
queries x classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detpact.config import PostprocessConfig
from detpact.models.boxes import batched_nms


@dataclass
class Detections:
    """One image's detections in input-image pixels: boxes [N, 4] xyxy, scores [N], labels [N],
    and locations [N] int64, the index of the location (into the model's A) each came from."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    locations: Tensor


@torch.no_grad()
def postprocess(cls_logits: Tensor, boxes: Tensor, cfg: PostprocessConfig, nms: bool = True) -> list[Detections]:
    """Per image: keep (location, class) pairs above the score threshold; with `nms`, take
    the `pre_nms_topk` best, run class-wise NMS and keep at most `max_det`; without, keep
    the `max_det` best.

    cls_logits: [B, A, C] logits; boxes: [B, A, 4] xyxy. A location may yield
    several classes (multi-label), as COCO-style evaluation expects.
    """
    return postprocess_scores(cls_logits.float().sigmoid(), boxes, cfg, nms)


def postprocess_scores(scores: Tensor, boxes: Tensor, cfg: PostprocessConfig, nms: bool = True) -> list[Detections]:
    """Same as `postprocess` but from probabilities [B, A, C] (e.g. an ONNX model's output)."""
    return [_postprocess_image(s.float(), b.float(), cfg, nms) for s, b in zip(scores, boxes)]


def _postprocess_image(scores: Tensor, boxes: Tensor, cfg: PostprocessConfig, nms: bool) -> Detections:
    num_classes = scores.shape[1]
    flat = scores.reshape(-1)  # [A * C]
    candidates = (flat > cfg.score_threshold).nonzero(as_tuple=True)[0]
    limit = cfg.pre_nms_topk if nms else cfg.max_det
    if candidates.numel() > limit:
        candidates = candidates[flat[candidates].topk(limit).indices]
    cand_scores = flat[candidates]
    loc, labels = candidates // num_classes, candidates % num_classes
    cand_boxes = boxes[loc]
    if nms:
        keep = batched_nms(cand_boxes, cand_scores, labels, cfg.iou_threshold)[: cfg.max_det]
    else:  # best first, as NMS returns them
        keep = cand_scores.argsort(descending=True, stable=True)
    return Detections(boxes=cand_boxes[keep], scores=cand_scores[keep], labels=labels[keep], locations=loc[keep])
