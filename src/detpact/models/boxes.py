"""Box math as pure functions on tensors.

Boxes are float tensors in xyxy = (x1, y1, x2, y2) unless a name says cxcywh. The
matrix functions (`box_iou`, `generalized_box_iou`) compare every box of one set with
every box of another, as in DETR's `util/box_ops.py`; the paired functions compare
boxes position by position and are the ones the training loss differentiates through.

Degenerate boxes (zero area, x2 < x1) are normal during training, so every division
here has a floor on its denominator: an overlap of nothing with nothing is 0, never
NaN, and the gradients stay finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Denominator floor for the matrix functions: exact for any union bigger than 1e-7
# (square pixels or squared normalised units), and 1 / EPS keeps gradients finite.
EPS = 1e-7


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h)."""
    x1, y1, x2, y2 = x.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) for normalised box coordinates, x clamped into [eps, 1 - eps] so that boxes
    at the border stay finite (the rtdetr head refines boxes in this space)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...]; an inverted side (x2 < x1) counts as length 0."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)  # [..., 2]
    return wh[..., 0] * wh[..., 1]


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable [..., 4] xyxy boxes -> [...] each."""
    # Per coordinate, not on [..., 2] slices: broadcasting over a trailing dim of 2 is
    # several times slower on CPU, and the N x N matrix in `nms` is a hot path.
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)  # [...]
    h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)  # [...]
    inter = w * h
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter, union


def _enclosing_sides(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Width and height of the smallest box enclosing boxes1 and boxes2 ([..., 4] xyxy) -> [...] each;
    negative only where both boxes are inverted."""
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    return torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1), torch.maximum(ay2, by2) - torch.minimum(ay1, by1)


def _giou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """GIoU of broadcastable [..., 4] xyxy boxes -> [...]."""
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / union.clamp(min=eps)
    # min/max of the corners also covers inverted boxes.
    w, h = _enclosing_sides(boxes1, boxes2)
    enclosing = w.clamp(min=0) * h.clamp(min=0)
    return iou - (enclosing - union) / enclosing.clamp(min=eps)


def _as_rows_and_columns(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """[N, 4], [M, 4] -> [N, 1, 4], [1, M, 4] views that broadcast to an [N, M] grid.

    Stored coordinate-major, so each coordinate is a contiguous vector: that halves
    the time of the [N, M] broadcasts on CPU (the inner loop no longer strides by 4).
    """
    boxes1 = boxes1.T.contiguous().T
    boxes2 = boxes2.T.contiguous().T
    return boxes1[:, None, :], boxes2[None, :, :]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU: [N, 4], [M, 4] xyxy -> (iou [N, M], union [N, M]).

    Two zero-area boxes have IoU 0 (not NaN); `union` is returned unfloored.
    """
    boxes1, boxes2 = _as_rows_and_columns(boxes1, boxes2)  # [N, 1, 4], [1, M, 4]
    inter, union = _inter_union(boxes1, boxes2)  # [N, M] each
    return inter / union.clamp(min=EPS), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU: [N, 4], [M, 4] xyxy -> [N, M] in [-1, 1].

    GIoU (https://giou.stanford.edu/) = IoU - (enclosing - union) / enclosing.
    """
    return _giou(*_as_rows_and_columns(boxes1, boxes2), EPS)


def paired_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of boxes1[i] with boxes2[i]: [..., 4], [..., 4] xyxy -> [...].

    Differentiable and finite (values and gradients) for degenerate boxes; meant for
    float32 inputs, since gradients of size 1 / eps overflow in half precision.
    """
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def paired_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalized IoU of boxes1[i] with boxes2[i]: [..., 4], [..., 4] xyxy -> [...] in [-1, 1].

    Same guarantees as `paired_iou`: the loss can take it on untrained (degenerate) boxes.
    """
    return _giou(boxes1, boxes2, eps)


def paired_ciou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of boxes1[i] with boxes2[i]: [..., 4], [..., 4] xyxy -> [...] in [-1.5, 1].

    CIoU (Zheng et al., 2020) = IoU - centre distance^2 / enclosing diagonal^2 - alpha * v,
    where v measures the aspect-ratio difference and alpha = v / (1 - IoU + v) is a
    weight without gradient. Finite for degenerate boxes: sides are floored at 1e-3
    (pixels) inside the aspect term, whose gradient would otherwise grow as 1 / side.
    """
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / union.clamp(min=eps)
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    cw, ch = _enclosing_sides(boxes1, boxes2)
    diagonal2 = (cw**2 + ch**2).clamp(min=eps)
    centre2 = ((ax1 + ax2 - bx1 - bx2) ** 2 + (ay1 + ay2 - by1 - by2) ** 2) / 4
    floor = 1e-3
    aspect1 = torch.atan((ax2 - ax1).clamp(min=floor) / (ay2 - ay1).clamp(min=floor))
    aspect2 = torch.atan((bx2 - bx1).clamp(min=floor) / (by2 - by1).clamp(min=floor))
    v = (4 / math.pi**2) * (aspect2 - aspect1) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diagonal2 + alpha * v)


def clip_boxes(boxes: Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """Clamp [..., 4] xyxy boxes into the image [0, width] x [0, height].

    `height` / `width` are ints or tensors broadcastable to boxes.shape[:-1] (e.g. [B, 1]
    for boxes [B, Q, 4]), so a traced export can take the image size as an input.
    """
    height = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    width = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width[..., None])  # [..., 2]
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height[..., None])  # [..., 2]
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression with torchvision.ops.nms semantics.

    Args:
        boxes: [N, 4] xyxy.
        scores: [N].
        iou_threshold: a box is dropped when its IoU with a higher-scoring kept box is
            strictly greater than this.

    Returns:
        [K] int64 indices into `boxes` of the kept boxes, by descending score; equal
        scores keep input order (the lower index wins).
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)  # [N]
    sorted_boxes = boxes[order]
    iou, _ = box_iou(sorted_boxes, sorted_boxes)  # [N, N]
    # overlaps[i, j]: i would suppress j, which needs i ranked before j. The greedy pass
    # below is sequential, so it runs on the host: a few microseconds a step instead of
    # a device sync, after one copy of N*N bools.
    overlaps = (iou > iou_threshold).triu(diagonal=1).cpu()  # [N, N]
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool)  # [N], in rank order
    # Only boxes that overlap some lower-ranked box can suppress anything, so the loop
    # visits those alone, best first; every other box is decided by them.
    for i in overlaps.any(dim=1).nonzero().flatten().tolist():
        if not suppressed[i]:
            suppressed |= overlaps[i]
    return order[(~suppressed).to(order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per class, in one `nms` call.

    Args:
        boxes: [N, 4] xyxy.
        scores: [N].
        idxs: [N] int64 class id of each box; boxes of different ids never suppress
            each other.
        iou_threshold: as in `nms`.

    Returns:
        [K] int64 indices into `boxes` of the kept boxes, by descending score.
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # Shift each class into its own region of the plane so boxes of different classes
    # cannot overlap. The step is the coordinate span + 1 rather than torchvision's
    # max + 1, which lets unclipped boxes with negative corners of two classes touch.
    span = boxes.max() - boxes.min() + 1
    offsets = idxs.to(boxes) * span  # [N]
    return nms(boxes + offsets[:, None], scores, iou_threshold)
