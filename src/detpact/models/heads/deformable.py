"""Multi-scale deformable attention (Deformable-DETR, in RT-DETR's box-relative form).

Each query reads a few bilinearly sampled points per head and level instead of every
position: the points sit at learned offsets around the query's reference box, and a
softmax over all of a head's points (all levels together) weighs them. The sampling is
plain `F.grid_sample`, one call per level, so it runs on any device and exports to
ONNX (GridSample) without a custom op.

grid_sample's CUDA backward accumulates with atomics, and under
`torch.use_deterministic_algorithms(True)` (detpact's `run.deterministic`) it refuses to
run. Training on CUDA in that mode therefore samples with `gather_bilinear`, the same
interpolation from four gathers, whose backward PyTorch makes deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def deformable_sample(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """The weighted sum of bilinear samples of `value` at `locations`.

    Args:
        value: [B, L, heads, hd] the levels' positions, flattened row-major and concatenated
            (L = sum of h * w over `shapes`).
        shapes: (h, w) of each level.
        locations: [B, Q, heads, levels * points, 2] float (x, y) in [0, 1] of the whole
            map, (0, 0) the top-left corner of the top-left cell; level-major on dim 3.
            Points outside the map read zeros.
        weights: [B, Q, heads, levels * points] attention weights.

    Returns:
        [B, Q, heads * hd] float32.
    """
    heads, hd = value.shape[2:]
    num_queries = locations.shape[1]
    points = locations.shape[3] // len(shapes)
    # Sampled in float32 whatever the autocast dtype: a bf16 grid would place points
    # to ~1/256 of the map (a third of a cell on an 80-wide P3).
    grids = (2 * locations.float() - 1).transpose(1, 2).flatten(0, 1)  # [B*heads, Q, levels*points, 2]
    values = value.float().split([h * w for h, w in shapes], dim=1)
    # A Python decision on flags, never on tensor values: eval and export take grid_sample.
    by_gather = value.is_cuda and torch.is_grad_enabled() and torch.are_deterministic_algorithms_enabled()
    samples = []
    for level, (h, w) in enumerate(shapes):
        v = values[level].permute(0, 2, 3, 1).flatten(0, 1).unflatten(-1, (h, w))  # [B*heads, hd, h, w]
        grid = grids[:, :, level * points:(level + 1) * points]  # [B*heads, Q, points, 2]
        if by_gather:
            samples.append(gather_bilinear(v, grid))
        else:
            samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.float().transpose(1, 2).flatten(0, 1).unsqueeze(1)  # [B*heads, 1, Q, levels*points]
    out = (torch.cat(samples, dim=-1) * weights).sum(-1)  # [B*heads, hd, Q]
    return out.reshape(-1, heads * hd, num_queries).transpose(1, 2)


def gather_bilinear(v: Tensor, grid: Tensor) -> Tensor:
    """`F.grid_sample(v, grid, "bilinear", "zeros", align_corners=False)` from four gathers.

    v: [N, c, h, w]; grid: [N, Q, P, 2] (x, y) in [-1, 1] -> [N, c, Q, P]. Same values and
    gradients (for v and grid) as grid_sample, but the backward is a scatter-add that
    PyTorch runs deterministically on CUDA when asked to.
    """
    n, c, h, w = v.shape
    q, p = grid.shape[1:3]
    x = (grid[..., 0] + 1) * (w / 2) - 0.5  # [N, Q, P] in pixels, 0 = centre of the first cell
    y = (grid[..., 1] + 1) * (h / 2) - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0  # the gradient to the grid flows through these
    flat = v.flatten(2)  # [N, c, h*w]
    out = 0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)  # outside corners read zero
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().flatten(1)  # [N, Q*P]
        corner = flat.gather(2, index[:, None, :].expand(-1, c, -1))  # [N, c, Q*P]
        out = out + corner * (weight * inside).flatten(1)[:, None, :]
    return out.unflatten(-1, (q, p))


class MSDeformableAttention(nn.Module):
    """query [B, Q, d] with reference boxes [B, Q, 4] attends to value [B, L, d] -> [B, Q, d].

    A sampling offset is relative to its reference box: offset * (w, h) * 0.5 / points
    from the box centre, so the initial k-th point of a head sits k / points of the way
    from the centre to the box edge (RT-DETR's `offset_scale` 0.5).
    """

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model})")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        total = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(d_model, total * 2)
        self.attention_weights = nn.Linear(d_model, total)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable-DETR's start: the offsets ignore the query; head h looks along the
        # direction 2 pi h / heads, its k-th point k steps out, so the heads fan out
        # evenly around the reference; uniform attention over the points.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # [heads, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values  # onto the unit square
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32).repeat(self.num_levels)  # [levels*points]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((directions[:, None, :] * steps[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, ref_boxes: Tensor, value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query [B, Q, d]; ref_boxes [B, Q, 4] cxcywh in [0, 1]; value [B, L, d] the flattened
        levels of `shapes` -> [B, Q, d]."""
        value = self.value_proj(value).unflatten(-1, (self.num_heads, -1))  # [B, L, heads, hd]
        offsets = self.sampling_offsets(query).unflatten(-1, (self.num_heads, -1, 2))  # [B, Q, heads, LP, 2]
        weights = self.attention_weights(query).unflatten(-1, (self.num_heads, -1)).softmax(-1)  # [B, Q, heads, LP]
        ref = ref_boxes.float()[:, :, None, None, :]  # [B, Q, 1, 1, 4]
        locations = ref[..., :2] + offsets.float() * ref[..., 2:] * (0.5 / self.num_points)
        out = deformable_sample(value, shapes, locations, weights)
        return self.output_proj(out.to(query.dtype))
