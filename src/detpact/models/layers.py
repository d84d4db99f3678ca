"""Convolution blocks shared by the backbone and the neck (YOLO-style CSP design)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WarmStartBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics start as the plain average of the batches seen.

    A running average with momentum m forgets its initial value (mean 0, variance 1)
    only after about ln(ratio) / m batches. At YOLO's m = 0.03 that is ~150 batches for
    a stem convolution on [0, 1] pixels, whose true output variance is ~1 % of the
    initial 1: until then every evaluation of the model runs on statistics several
    times too large, which squashes the signal through the whole network (measured on
    raccoon: the raw model scored 0.0 mAP at step 80 and 0.15 after recalibrating BN).
    So batch n updates with weight max(m, 1 / n): the exact mean of the first 1 / m
    batches, then the usual moving average. The state is the standard buffers
    (`num_batches_tracked` counts the batches), so checkpoints and foreign weights
    load unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        average = 1.0 / float(self.num_batches_tracked)  # momentum None: the plain average throughout
        factor = average if self.momentum is None else max(self.momentum, average)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> SiLU, 'same' padding."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
            # YOLO's BN settings: a slower running-stat update suits small batches.
            WarmStartBatchNorm2d(c_out, eps=1e-3, momentum=0.03),
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


class DWConvBNAct(nn.Sequential):
    """Depthwise k x k conv -> BatchNorm -> SiLU (groups = channels)."""

    def __init__(self, c: int, k: int = 3, s: int = 1):
        super().__init__(
            nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False),
            WarmStartBatchNorm2d(c, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm, no activation (attention projections)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, 1, k // 2, groups=groups, bias=False),
            WarmStartBatchNorm2d(c_out, eps=1e-3, momentum=0.03),
        )


class ThinBottleneck(nn.Module):
    """3x3 conv to half the channels, 3x3 conv back, residual (YOLO11's bottleneck, e = 0.5)."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c // 2, 3)
        self.cv2 = ConvBNAct(c // 2, c, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C3k(nn.Module):
    """A small CSP block: half the channels through two bottlenecks, half around them."""

    def __init__(self, c: int, shortcut: bool = True, n: int = 2):
        super().__init__()
        hidden = c // 2
        self.cv1 = ConvBNAct(c, hidden, 1)
        self.cv2 = ConvBNAct(c, hidden, 1)
        self.blocks = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(n)))
        self.cv3 = ConvBNAct(2 * hidden, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat([self.blocks(self.cv1(x)), self.cv2(x)], dim=1))


class C3k2(CSPBlock):
    """YOLO11's CSP block: C2f's split-and-concatenate layout with `expand` x c_out hidden
    channels and cheaper inner blocks, thin bottlenecks or (`c3k`) C3k blocks."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, c3k: bool = False,
                 expand: float = 0.5):
        nn.Module.__init__(self)
        self.hidden = int(c_out * expand)
        self.cv1 = ConvBNAct(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(
            C3k(self.hidden, shortcut) if c3k else ThinBottleneck(self.hidden, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.hidden, c_out, 1)


class PositionAttention(nn.Module):
    """Multi-head self-attention over the positions of a feature map, with a depthwise 3x3
    positional term on the values (YOLO11's Attention): keys and queries use half a
    head's channels."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = c // heads
        self.key_dim = self.head_dim // 2
        self.qkv = ConvBN(c, c + 2 * self.key_dim * heads, 1)
        self.proj = ConvBN(c, c, 1)
        self.position = ConvBN(c, c, 3, groups=c)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)  # [B, heads, d, HW] each
        attn = (q.transpose(-2, -1) @ k * self.key_dim**-0.5).softmax(dim=-1)  # [B, heads, HW, HW]
        out = (v @ attn.transpose(-2, -1)).reshape(b, c, h, w) + self.position(v.reshape(b, c, h, w))
        return self.proj(out)


class C2PSA(nn.Module):
    """YOLO11's attention block on P5: half the channels through attention + a feed-forward
    layer (both residual), half around them."""

    def __init__(self, c: int, n: int = 1):
        super().__init__()
        self.hidden = c // 2
        self.cv1 = ConvBNAct(c, 2 * self.hidden, 1)
        self.attention = nn.ModuleList(PositionAttention(self.hidden, max(1, self.hidden // 64)) for _ in range(n))
        self.ffn = nn.ModuleList(
            nn.Sequential(ConvBNAct(self.hidden, 2 * self.hidden, 1), ConvBN(2 * self.hidden, self.hidden, 1))
            for _ in range(n))
        self.cv2 = ConvBNAct(2 * self.hidden, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).chunk(2, dim=1)
        for attention, ffn in zip(self.attention, self.ffn):
            b = b + attention(b)
            b = b + ffn(b)
        return self.cv2(torch.cat([a, b], dim=1))
