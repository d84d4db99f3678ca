"""Convolution blocks shared by the backbone and the neck (YOLO-style CSP design)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> SiLU, 'same' padding."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
            # YOLO's BN settings: a slower running-stat update suits small batches.
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    """Two 3x3 convs with an optional residual connection."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class CSPBlock(nn.Module):
    """Cross-stage-partial block (YOLOv8's C2f): split, n bottlenecks, concat every stage."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBNAct(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.hidden, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.cv2 = ConvBNAct(hidden * 4, c_out, 1)
        self.pool = nn.MaxPool2d(k, stride=1, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y0 = self.cv1(x)
        y1 = self.pool(y0)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([y0, y1, y2, self.pool(y2)], dim=1))
