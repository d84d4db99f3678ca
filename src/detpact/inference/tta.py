"""Test-time augmentation (TTA): predict on several views of a batch and merge the results.

The flow for one batch of letterboxed model inputs [B, 3, S, S]:

    for view in tta_views(scales, flip):
        outputs = model(augment(images, view))             # view side V = augmented_size(S, view)
        per image: detections = postprocess(...)           # boxes in the V x V view frame
                   boxes = unaugment_boxes(boxes, view, S, V)  # back to the S x S input frame
    per image: merge_detections([one Detections per view])

Everything here is pure tensor code: no model, no config, no files. The views are
resized by a whole number of strides, so the scale a view really has is V / S, not
`view.scale`; that is why `unaugment_boxes` takes both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detpact.errors import DetpactError
from detpact.models.boxes import batched_nms
from detpact.models.postprocess import Detections

MERGE_METHODS = ("wbf", "nms")
CONF_TYPES = ("avg", "max")


@dataclass(frozen=True)
class TTAView:
    """One augmentation: resize by `scale`, then mirror left-right if `flip`."""

    scale: float
    flip: bool


def tta_views(scales: Sequence[float], flip: bool) -> list[TTAView]:
    """The identity view (1.0, no flip) first, then each scale without and (with `flip`)
    with a horizontal flip, in the order given, each view once."""
    values = [_check_scale(scale) for scale in scales]
    views = [TTAView(1.0, False)]
    for scale in values:
        for flipped in (False, True) if flip else (False,):
            view = TTAView(scale, flipped)
            if view not in views:
                views.append(view)
    return views


def _check_scale(scale: float) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(scale, bool) or not math.isfinite(value) or value <= 0:
        raise DetpactError(f"TTA scale {scale!r} is not a finite number > 0; use scales such as 0.83, 1.0, 1.17")
    return value


def augmented_size(size: int, view: TTAView, stride: int = 32) -> int:
    """The side of `view` for an input side `size`: size * scale rounded to a multiple of
    `stride` (the model's largest downsampling), and at least one stride."""
    return max(stride, round(size * view.scale / stride) * stride)


def augment(images: Tensor, view: TTAView, stride: int = 32) -> Tensor:
    """[B, C, S, S] float images -> [B, C, V, V], V = augmented_size(S, view, stride).

    Bilinear without antialiasing, as the letterbox resize of the input pipeline; the
    identity view returns `images` itself.
    """
    height, width = images.shape[-2:]
    size = (augmented_size(height, view, stride), augmented_size(width, view, stride))
    out = images
    if size != (height, width):
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False, antialias=False)
    if view.flip:
        out = out.flip(-1)
    return out


def unaugment_boxes(boxes: Tensor, view: TTAView, input_size: int, view_size: int) -> Tensor:
    """[N, 4] xyxy boxes in the view_size x view_size frame of `view` -> [N, 4] xyxy in the
    input_size x input_size input frame: undo the flip, then the resize."""
    if view.flip:
        x1, y1, x2, y2 = boxes.unbind(-1)
        boxes = torch.stack([view_size - x2, y1, view_size - x1, y2], dim=-1)
    return boxes * (input_size / view_size)


def merge_detections(
    per_view: list[Detections],
    method: str = "wbf",
    iou_threshold: float = 0.55,
    skip_score: float = 0.0,
    max_det: int = 300,
    conf_type: str = "avg",
) -> Detections:
    """Merge one image's detections from every view (boxes already in the input frame).

    method "wbf": weighted boxes fusion (Solovyev et al., 2019), class-wise; "nms":
    class-wise NMS over all views' boxes at `iou_threshold`. Boxes scoring below
    `skip_score` are dropped first. Returns at most `max_det` detections, best first;
    `locations` are -1, since a merged box comes from no single model location.
    """
    if method not in MERGE_METHODS:
        raise DetpactError(f"unknown TTA merge method '{method}'; choices: {', '.join(MERGE_METHODS)}")
    if conf_type not in CONF_TYPES:
        raise DetpactError(f"unknown TTA conf_type '{conf_type}'; choices: {', '.join(CONF_TYPES)}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise DetpactError(f"TTA iou_threshold {iou_threshold} is outside [0, 1]")
    if max_det < 1:
        raise DetpactError(f"TTA max_det {max_det} must be at least 1")
    if not per_view:
        return _empty_detections(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.int64))
    boxes = torch.cat([d.boxes for d in per_view])  # [N, 4]
    scores = torch.cat([d.scores for d in per_view])  # [N]
    labels = torch.cat([d.labels for d in per_view])  # [N]
    keep = scores >= skip_score
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if boxes.shape[0] == 0:
        return _empty_detections(boxes, scores, labels)
    if method == "nms":
        keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_det]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    else:
        boxes, scores, labels = _weighted_boxes_fusion(boxes, scores, labels, len(per_view), iou_threshold, conf_type)
        order = scores.argsort(descending=True, stable=True)[:max_det]
        boxes, scores, labels = boxes[order], scores[order], labels[order]
    locations = torch.full_like(labels, -1, dtype=torch.int64)
    return Detections(boxes=boxes, scores=scores, labels=labels, locations=locations)


def _empty_detections(boxes: Tensor, scores: Tensor, labels: Tensor) -> Detections:
    return Detections(
        boxes=boxes.new_zeros(0, 4),
        scores=scores.new_zeros(0),
        labels=labels.new_zeros(0),
        locations=torch.zeros(0, dtype=torch.int64, device=boxes.device),
    )


def _weighted_boxes_fusion(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_views: int, iou_threshold: float, conf_type: str
) -> tuple[Tensor, Tensor, Tensor]:
    """WBF over [N, 4] boxes, [N] scores, [N] labels -> fused (boxes [K, 4], scores [K], labels [K]),
    grouped by class. The greedy pass is sequential, so it runs in float64 numpy on the host."""
    boxes_np = boxes.detach().cpu().double().numpy()
    scores_np = scores.detach().cpu().double().numpy()
    labels_np = labels.detach().cpu().numpy()
    fused_boxes, fused_scores, fused_labels = [], [], []
    for label in np.unique(labels_np):
        members = np.nonzero(labels_np == label)[0]
        b, s = _fuse_class(boxes_np[members], scores_np[members], num_views, iou_threshold, conf_type)
        fused_boxes.append(b)
        fused_scores.append(s)
        fused_labels.append(np.full(len(s), label, dtype=labels_np.dtype))
    return (
        torch.from_numpy(np.concatenate(fused_boxes)).to(boxes),
        torch.from_numpy(np.concatenate(fused_scores)).to(scores),
        torch.from_numpy(np.concatenate(fused_labels)).to(labels),
    )


def _fuse_class(
    boxes: np.ndarray, scores: np.ndarray, num_views: int, iou_threshold: float, conf_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """One class's boxes [n, 4] and scores [n] -> fused boxes [k, 4] and scores [k].

    Best score first, each box joins the first cluster whose fused box overlaps it with
    IoU > iou_threshold, else opens a new one; a cluster's fused box is the score-weighted
    mean of its members, updated as each joins.
    """
    n = len(scores)
    fused = np.zeros((n, 4))  # [k, 4] fused box of each cluster so far
    weighted_sum = np.zeros((n, 4))  # sum of score * box
    plain_sum = np.zeros((n, 4))  # sum of box: the fused box when all scores are 0
    score_sum, score_max, count = np.zeros(n), np.zeros(n), np.zeros(n)
    k = 0
    for i in np.argsort(-scores, kind="stable"):
        hits = np.nonzero(_iou_one_to_many(boxes[i], fused[:k]) > iou_threshold)[0]
        j = hits[0] if hits.size else k
        k += 0 if hits.size else 1
        weighted_sum[j] += scores[i] * boxes[i]
        plain_sum[j] += boxes[i]
        score_sum[j] += scores[i]
        score_max[j] = max(score_max[j], scores[i])
        count[j] += 1
        fused[j] = weighted_sum[j] / score_sum[j] if score_sum[j] > 0 else plain_sum[j] / count[j]
    count = count[:k]
    if conf_type == "max":
        fused_scores = score_max[:k]
    else:  # a box that only some views found is penalised: mean * min(count, views) / views
        fused_scores = score_sum[:k] / count * np.minimum(count, num_views) / num_views
    return fused[:k], fused_scores


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] with each of [k, 4] -> [k]; zero-area pairs give 0."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return inter / np.maximum(area + areas - inter, 1e-7)
