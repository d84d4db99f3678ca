"""Anchor-free dense head (FCOS / YOLOv8 style): per-location class scores and box.

Every location of every level predicts C class logits and four distances
(left, top, right, bottom) from its centre to the box edges. Distances are
`exp(scale_l * x) * stride`, computed in float32 so bf16 autocast cannot overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detpact.models.layers import ConvBNAct

# Initial foreground probability of every class logit (RetinaNet's prior): keeps
# the early classification loss from being swamped by the many easy negatives.
PRIOR_PROB = 0.01


@dataclass
class DetectorOutput:
    """What `Detector.forward` returns, in training and in inference alike.

    cls_logits: [B, A, C] raw class logits for the A locations of all levels.
    boxes:      [B, A, 4] float32 xyxy boxes in input-image pixels.
    points:     [A, 2] float32 (x, y) location centres in input-image pixels.
    strides:    [A] float32 stride of each location's level.
    """

    cls_logits: Tensor
    boxes: Tensor
    points: Tensor
    strides: Tensor


def _branch(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(ConvBNAct(c_in, hidden, 3), ConvBNAct(hidden, hidden, 3), nn.Conv2d(hidden, c_out, 1))


class DenseHead(nn.Module):
    """Decoupled classification and regression branches on each pyramid level."""

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        hidden = in_channels[0]
        self.num_classes = num_classes
        self.strides = strides
        self.cls_branches = nn.ModuleList(_branch(c, hidden, num_classes) for c in in_channels)
        self.reg_branches = nn.ModuleList(_branch(c, hidden, 4) for c in in_channels)
        # Learnable per-level scale of the exp() regression (FCOS).
        self.reg_scales = nn.Parameter(torch.ones(len(in_channels)))
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, bias)
        for branch in self.reg_branches:
            nn.init.zeros_(branch[-1].bias)

    def forward(self, feats: tuple[Tensor, ...]) -> DetectorOutput:
        logits, ltrb, points, strides = [], [], [], []
        for level, x in enumerate(feats):
            b, _, h, w = x.shape
            stride = self.strides[level]
            logits.append(self.cls_branches[level](x).flatten(2).transpose(1, 2))  # [B, HW, C]
            reg = self.reg_branches[level](x).flatten(2).transpose(1, 2).float()  # [B, HW, 4]
            # Clamp before exp: a diverging step must not produce inf boxes.
            ltrb.append(torch.exp((reg * self.reg_scales[level]).clamp(max=12.0)) * stride)
            points.append(_grid_points(h, w, stride, x.device))
            strides.append(torch.full((h * w,), float(stride), device=x.device))
        pts = torch.cat(points)  # [A, 2]
        dist = torch.cat(ltrb, dim=1)  # [B, A, 4]
        boxes = torch.cat([pts - dist[..., :2], pts + dist[..., 2:]], dim=-1)
        return DetectorOutput(
            cls_logits=torch.cat(logits, dim=1), boxes=boxes, points=pts, strides=torch.cat(strides)
        )


def _grid_points(h: int, w: int, stride: int, device: torch.device) -> Tensor:
    """Centres of an h x w grid of cells of size `stride`: [h*w, 2] as (x, y)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)
