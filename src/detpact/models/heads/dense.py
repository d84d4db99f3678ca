"""Anchor-free dense head (FCOS / YOLOv8 style): per-location class scores and box.

Every location of every level predicts C class logits and four distances
(left, top, right, bottom) from its centre to the box edges, in one of two ways:

- reg_max = 1: a distance is `exp(scale_l * x) * stride`, from one logit per side;
- reg_max > 1: each side is a distribution over the bins 0, 1, ..., reg_max - 1 (in
  strides), its logits trained with distribution focal loss (GFL / YOLOv8), and the
  distance is its expectation times the stride.

Both are computed in float32 so that bf16 autocast cannot overflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detpact.models.layers import ConvBNAct, DWConvBNAct
from detpact.models.outputs import DetectorOutput

# Initial foreground probability of every class logit (RetinaNet's prior): keeps
# the early classification loss from being swamped by the many easy negatives.
PRIOR_PROB = 0.01


def _branch(c_in: int, hidden: int, c_out: int, depthwise: bool = False) -> nn.Sequential:
    if depthwise:  # YOLO11's classification branch: each 3x3 conv depthwise, then 1x1
        return nn.Sequential(DWConvBNAct(c_in), ConvBNAct(c_in, hidden, 1), DWConvBNAct(hidden),
                             ConvBNAct(hidden, hidden, 1), nn.Conv2d(hidden, c_out, 1))
    return nn.Sequential(ConvBNAct(c_in, hidden, 3), ConvBNAct(hidden, hidden, 3), nn.Conv2d(hidden, c_out, 1))


class DenseHead(nn.Module):
    """Decoupled classification and regression branches on each pyramid level."""

    nms_free = False  # overlapping locations predict the same object: decode with NMS

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, reg_max: int = 1,
                 depthwise_cls: bool = False, strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        hidden = in_channels[0]
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = strides
        self.cls_branches = nn.ModuleList(_branch(c, hidden, num_classes, depthwise_cls) for c in in_channels)
        self.reg_branches = nn.ModuleList(_branch(c, hidden, 4 * reg_max) for c in in_channels)
        if reg_max == 1:
            # Learnable per-level scale of the exp() regression (FCOS).
            self.reg_scales = nn.Parameter(torch.ones(len(in_channels)))
        else:
            self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, bias)
        for branch in self.reg_branches:
            nn.init.zeros_(branch[-1].bias)

    def forward(self, feats: tuple[Tensor, ...], targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        """The outputs of every location; `targets` is not read (the rtdetr head's denoising
        reads its own), so both heads share one call."""
        logits, ltrb, box_logits, points, strides = [], [], [], [], []
        for level, x in enumerate(feats):
            b, _, h, w = x.shape
            stride = self.strides[level]
            logits.append(self.cls_branches[level](x).flatten(2).transpose(1, 2))  # [B, HW, C]
            reg = self.reg_branches[level](x).flatten(2).transpose(1, 2).float()  # [B, HW, 4 * reg_max]
            if self.reg_max == 1:
                # Clamp before exp: a diverging step must not produce inf boxes.
                ltrb.append(torch.exp((reg * self.reg_scales[level]).clamp(max=12.0)) * stride)
            else:
                reg = reg.reshape(b, h * w, 4, self.reg_max)
                box_logits.append(reg)
                ltrb.append((reg.softmax(dim=-1) @ self.bins) * stride)  # [B, HW, 4]
            points.append(_grid_points(h, w, stride, x.device))
            strides.append(torch.full((h * w,), float(stride), device=x.device))
        pts = torch.cat(points)  # [A, 2]
        dist = torch.cat(ltrb, dim=1)  # [B, A, 4]
        boxes = torch.cat([pts - dist[..., :2], pts + dist[..., 2:]], dim=-1)
        return DetectorOutput(
            cls_logits=torch.cat(logits, dim=1), boxes=boxes, points=pts, strides=torch.cat(strides),
            box_logits=torch.cat(box_logits, dim=1) if box_logits else None,
        )


def _grid_points(h: int, w: int, stride: int, device: torch.device) -> Tensor:
    """Centres of an h x w grid of cells of size `stride`: [h*w, 2] as (x, y)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)
