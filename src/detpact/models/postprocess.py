"""Turn `DetectorOutput` into final detections: score threshold, top-k, per-class NMS."""

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
def postprocess(cls_logits: Tensor, boxes: Tensor, cfg: PostprocessConfig) -> list[Detections]:
    """Per image: keep (location, class) pairs above the score threshold, take the
    `pre_nms_topk` best, run class-wise NMS and keep at most `max_det`.

    cls_logits: [B, A, C] logits; boxes: [B, A, 4] xyxy. A location may yield
    several classes (multi-label), as COCO-style evaluation expects.
    """
    return [
        _postprocess_image(logits.float().sigmoid(), image_boxes.float(), cfg)
        for logits, image_boxes in zip(cls_logits, boxes)
    ]


def postprocess_scores(scores: Tensor, boxes: Tensor, cfg: PostprocessConfig) -> list[Detections]:
    """Same as `postprocess` but from probabilities [B, A, C] (e.g. an ONNX model's output)."""
    return [_postprocess_image(s.float(), b.float(), cfg) for s, b in zip(scores, boxes)]


def _postprocess_image(scores: Tensor, boxes: Tensor, cfg: PostprocessConfig) -> Detections:
    num_classes = scores.shape[1]
    flat = scores.reshape(-1)  # [A * C]
    candidates = (flat > cfg.score_threshold).nonzero(as_tuple=True)[0]
    if candidates.numel() > cfg.pre_nms_topk:
        top = flat[candidates].topk(cfg.pre_nms_topk).indices
        candidates = candidates[top]
    cand_scores = flat[candidates]
    loc, labels = candidates // num_classes, candidates % num_classes
    cand_boxes = boxes[loc]
    keep = batched_nms(cand_boxes, cand_scores, labels, cfg.iou_threshold)[: cfg.max_det]
    return Detections(boxes=cand_boxes[keep], scores=cand_scores[keep], labels=labels[keep], locations=loc[keep])
