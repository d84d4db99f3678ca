"""Target assignment for the dense head: which ground-truth box each location predicts.

Two assigners, both `assigner(outputs, gt_boxes, gt_labels, gt_valid) -> Assignment`:

`CenterSamplingAssigner` (FCOS-style centre sampling with per-level scale ranges), fixed
by geometry. A location is a positive for a ground-truth box when all of these hold:
  1. it lies inside the box,
  2. it lies within `center_radius * stride` of the box centre (on both axes),
  3. the largest of its four regression distances suits its level: it falls in
     (lower, upper] of that level's range, so big boxes go to coarse levels.
A location claimed by several boxes takes the smallest one (the most specific).

`TaskAlignedAssigner` (TOOD / YOLOv8's TAL) follows the model: each box takes the
`topk` locations inside it whose predictions already agree best with it, by the
alignment score^alpha * CIoU^beta, and their classification targets are that
alignment rescaled so that each box's best location gets its best IoU.

For the rtdetr head, `HungarianMatcher` pairs queries with boxes one to one (DETR's
bipartite matching with RT-DETR's focal class cost); unmatched queries are background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detpact.config import AssignerConfig, MatcherConfig
from detpact.models.boxes import box_area, box_cxcywh_to_xyxy, generalized_box_iou, paired_ciou
from detpact.models.outputs import DetectorOutput


@dataclass
class Assignment:
    """matched: [B, A] int64 index into G of each location's box, -1 for background.
    quality: [B, A] float32 classification target of each positive (0 elsewhere), or None
    when the target is the IoU of the predicted box (centre sampling)."""

    matched: Tensor
    quality: Tensor | None = None


class CenterSamplingAssigner:
    """Assign each location to at most one ground-truth box (batched, no Python loop)."""

    def __init__(self, center_radius: float = 1.5, range_strides: list[float] | tuple[float, ...] = (8.0, 8.0)):
        self.center_radius = center_radius
        self.range_strides = tuple(range_strides)

    def level_ranges(self, strides: Tensor) -> tuple[Tensor, Tensor]:
        """Per-location (lower, upper) bound on max(l, t, r, b): [A] each.

        Level k's upper bound is range_strides[k] * stride_k; the next level starts
        there; the last level is unbounded.
        """
        levels = torch.unique(strides)  # ascending
        lower = torch.zeros_like(strides)
        upper = torch.full_like(strides, float("inf"))
        bound = 0.0
        for k, stride in enumerate(levels.tolist()):
            on_level = strides == stride
            lower[on_level] = bound
            if k < len(self.range_strides) and k < len(levels) - 1:
                bound = self.range_strides[k] * stride
                upper[on_level] = bound
        return lower, upper

    def __call__(self, outputs: DetectorOutput, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        return Assignment(self.match(outputs.points, outputs.strides, gt_boxes, gt_valid))

    @torch.no_grad()
    def match(self, points: Tensor, strides: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        """Match locations to ground truth.

        points:   [A, 2] location centres (x, y) in pixels.
        strides:  [A] stride of each location.
        gt_boxes: [B, G, 4] xyxy pixels, padded to the batch's max box count G.
        gt_valid: [B, G] bool, False on padding.
        Returns matched: [B, A] int64 index into G of the assigned box, -1 for background.
        """
        batch, num_gt = gt_valid.shape
        if num_gt == 0:
            return torch.full((batch, points.shape[0]), -1, dtype=torch.long, device=points.device)
        px = points[None, :, None, 0]  # [1, A, 1]
        py = points[None, :, None, 1]
        x1, y1, x2, y2 = (gt_boxes[:, None, :, i] for i in range(4))  # [B, 1, G]
        ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=-1)  # [B, A, G, 4]
        inside_box = ltrb.amin(dim=-1) > 0

        radius = (self.center_radius * strides)[None, :, None]  # [1, A, 1]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        near_centre = ((px - cx).abs() < radius) & ((py - cy).abs() < radius)

        lower, upper = self.level_ranges(strides)
        max_dist = ltrb.amax(dim=-1)  # [B, A, G]
        in_range = (max_dist > lower[None, :, None]) & (max_dist <= upper[None, :, None])

        candidate = inside_box & near_centre & in_range & gt_valid[:, None, :]
        area = box_area(gt_boxes)[:, None, :].expand_as(candidate)  # [B, A, G]
        area = torch.where(candidate, area, torch.full_like(area, float("inf")))
        best_area, best_gt = area.min(dim=-1)  # [B, A]
        return torch.where(torch.isfinite(best_area), best_gt, torch.full_like(best_gt, -1))


class TaskAlignedAssigner:
    """Task-aligned assignment (batched over images and boxes)."""

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, small_box_side: float | None = None):
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.small_box_side = small_box_side

    @torch.no_grad()
    def __call__(self, outputs: DetectorOutput, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor) -> Assignment:
        """outputs: the detector's (cls_logits [B, A, C], boxes [B, A, 4], points [A, 2]);
        gt_boxes [B, G, 4] xyxy pixels, gt_labels [B, G] int64, gt_valid [B, G] bool."""
        batch, num_gt = gt_valid.shape
        num_locations = outputs.points.shape[0]
        if num_gt == 0:
            empty = torch.full((batch, num_locations), -1, dtype=torch.long, device=gt_boxes.device)
            return Assignment(empty, torch.zeros(batch, num_locations, device=gt_boxes.device))
        scores = outputs.cls_logits.detach().float().sigmoid()  # [B, A, C]
        pred_boxes = outputs.boxes.detach().float()  # [B, A, 4]
        inside = self._inside(outputs.points, gt_boxes) & gt_valid[:, :, None]  # [B, G, A]
        # The score each location gives each box's class: [B, G, A].
        class_scores = scores.gather(2, gt_labels[:, None, :].expand(-1, num_locations, -1)).transpose(1, 2)
        overlaps = paired_ciou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp(min=0) * inside  # [B, G, A]
        align = class_scores.pow(self.alpha) * overlaps.pow(self.beta) * inside
        top = align.topk(min(self.topk, num_locations), dim=-1).indices  # [B, G, k]
        candidate = torch.zeros_like(inside).scatter_(-1, top, True) & inside
        # A location picked by several boxes keeps the one its prediction overlaps most.
        best_overlap, best_gt = torch.where(candidate, overlaps, -1.0).max(dim=1)  # [B, A]
        matched = torch.where(candidate.any(dim=1), best_gt, torch.full_like(best_gt, -1))
        positive = candidate & (best_gt[:, None, :] == torch.arange(num_gt, device=gt_boxes.device)[None, :, None])
        align = align * positive
        overlaps = overlaps * positive
        # Rescale each box's alignments so that its best location's target is its best IoU.
        scale = overlaps.amax(dim=-1, keepdim=True) / align.amax(dim=-1, keepdim=True).clamp(min=1e-9)  # [B, G, 1]
        quality = (align * scale).amax(dim=1)  # [B, A]
        return Assignment(matched, quality)

    def _inside(self, points: Tensor, gt_boxes: Tensor) -> Tensor:
        """[B, G, A] whether each location centre lies strictly inside each box (small boxes
        grown to `small_box_side` about their centre first)."""
        boxes = gt_boxes
        if self.small_box_side is not None:
            centre = (boxes[..., :2] + boxes[..., 2:]) / 2
            half = (boxes[..., 2:] - boxes[..., :2]).clamp(min=self.small_box_side) / 2
            boxes = torch.cat([centre - half, centre + half], dim=-1)
        px, py = points[None, None, :, 0], points[None, None, :, 1]  # [1, 1, A]
        x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # [B, G, 1]
        return (px > x1) & (py > y1) & (px < x2) & (py < y2)


Assigner = CenterSamplingAssigner | TaskAlignedAssigner


def build_assigner(cfg: AssignerConfig) -> Assigner:
    if cfg.name == "task_aligned":
        return TaskAlignedAssigner(cfg.topk, cfg.alpha, cfg.beta, cfg.small_box_side)
    return CenterSamplingAssigner(cfg.center_radius, cfg.range_strides)


# Stands in for NaN / inf costs (diverged predictions): linear_sum_assignment rejects
# non-finite entries, and such a pair should simply be the last choice.
LARGE_COST = 1e8


def focal_class_cost(probs: Tensor, alpha: float, gamma: float) -> Tensor:
    """RT-DETR's class cost from the probabilities p of the target classes (any shape).

    The focal loss of calling the query positive minus that of calling it negative:
    alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), low when p is high.
    """
    pos = alpha * (1 - probs).pow(gamma) * -(probs + 1e-8).log()
    neg = (1 - alpha) * probs.pow(gamma) * -(1 - probs + 1e-8).log()
    return pos - neg


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth boxes (DETR's bipartite matching).

    The cost of pairing query q with box j is
        cost_class * focal_class_cost(p_q[label_j])
      + cost_bbox  * L1(box_q, box_j)          (normalised cxcywh)
      + cost_giou  * -GIoU(box_q, box_j)        (xyxy),
    and each image's total cost is minimised exactly by `linear_sum_assignment`.
    Queries left unmatched (Q > N) are background.
    """

    def __init__(self, cfg: MatcherConfig):
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match the queries of each image to its targets.

        logits:  [B, Q, C] class logits (sigmoid = score).
        boxes:   [B, Q, 4] predicted cxcywh boxes, normalised to [0, 1].
        targets: B dicts with "labels" [N_i] int64 and "boxes" [N_i, 4] cxcywh, normalised;
                 any device, N_i may be 0.
        Returns B pairs (query_idx [K_i], target_idx [K_i]), int64 on the CPU, K_i = min(Q, N_i):
        query query_idx[k] predicts box target_idx[k]; query_idx is ascending.
        """
        batch, num_queries = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(batch)]

        # One cost matrix for the whole batch, [B * Q, sum N_i]; the blocks pairing an
        # image's queries with another image's boxes are computed and then ignored,
        # which is cheaper than B small launches.
        device = logits.device
        probs = logits.detach().flatten(0, 1).float().sigmoid()  # [B*Q, C]
        pred_boxes = boxes.detach().flatten(0, 1).float()  # [B*Q, 4]
        gt_labels = torch.cat([t["labels"] for t in targets]).to(device)  # [T]
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)  # [T, 4]

        cost_class = focal_class_cost(probs[:, gt_labels], self.cfg.alpha, self.cfg.gamma)  # [B*Q, T]
        cost_bbox = torch.cdist(pred_boxes, gt_boxes, p=1)  # [B*Q, T]
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))  # [B*Q, T]
        cost = self.cfg.cost_class * cost_class + self.cfg.cost_bbox * cost_bbox + self.cfg.cost_giou * cost_giou
        cost = torch.nan_to_num(cost, nan=LARGE_COST, posinf=LARGE_COST, neginf=-LARGE_COST)
        cost = cost.view(batch, num_queries, -1).cpu()  # [B, Q, T]

        from scipy.optimize import linear_sum_assignment  # here: scipy.optimize's import costs every command ~0.5 s

        indices = []
        for i, image_cost in enumerate(cost.split(sizes, dim=-1)):  # image_cost: [B, Q, N_i]
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            query_idx, target_idx = linear_sum_assignment(image_cost[i].numpy())
            indices.append((torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices


def build_matcher(cfg: MatcherConfig) -> HungarianMatcher:
    return HungarianMatcher(cfg)
