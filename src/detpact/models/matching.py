"""Target assignment for the dense head: which ground-truth box each location predicts.

FCOS-style centre sampling with per-level scale ranges. A location is a positive for
a ground-truth box when all of these hold:
  1. it lies inside the box,
  2. it lies within `center_radius * stride` of the box centre (on both axes),
  3. the largest of its four regression distances suits its level: it falls in
     (lower, upper] of that level's range, so big boxes go to coarse levels.
A location claimed by several boxes takes the smallest one (the most specific).
"""

from __future__ import annotations

import torch
from torch import Tensor

from detpact.config import AssignerConfig
from detpact.models.boxes import box_area


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

    @torch.no_grad()
    def __call__(self, points: Tensor, strides: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
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


def build_assigner(cfg: AssignerConfig) -> CenterSamplingAssigner:
    return CenterSamplingAssigner(cfg.center_radius, cfg.range_strides)
