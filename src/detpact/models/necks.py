"""Necks: fuse backbone features across scales (top-down, then bottom-up)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detpact.config import NeckConfig
from detpact.models.layers import C3k2, ConvBNAct, CSPBlock


class PAN(nn.Module):
    """Path-aggregation network (FPN top-down + bottom-up path), YOLOv8 layout.

    Input and output: three maps at strides 8, 16, 32 with `channels` channels each
    (the output keeps the input channel counts).
    """

    def __init__(self, channels: tuple[int, int, int], block: str = "c2f"):
        super().__init__()
        c3, c4, c5 = channels

        def csp(c_in: int, c_out: int, deep: bool = False) -> nn.Module:
            if block == "c2f":
                return CSPBlock(c_in, c_out, shortcut=False)
            return C3k2(c_in, c_out, shortcut=True, c3k=deep)  # YOLO11's neck: C3k on the P5 output

        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = csp(c5 + c4, c4)
        self.td3 = csp(c4 + c3, c3)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bu4 = csp(c3 + c4, c4)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bu5 = csp(c4 + c5, c5, deep=True)
        self.out_channels = channels

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat([self.up(p5), p4], dim=1))
        n3 = self.td3(torch.cat([self.up(t4), p3], dim=1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], dim=1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], dim=1))
        return n3, n4, n5


class NoNeck(nn.Identity):
    """The backbone's maps unchanged (for heads that fuse scales themselves)."""

    def __init__(self, channels: tuple[int, int, int], block: str = "c2f"):
        super().__init__()
        self.out_channels = channels


NECKS = {"pan": PAN, "none": NoNeck}


def build_neck(cfg: NeckConfig, in_channels: tuple[int, int, int]) -> nn.Module:
    if cfg.name not in NECKS:
        raise ValueError(f"unknown neck {cfg.name!r}; choices: {sorted(NECKS)}")
    return NECKS[cfg.name](in_channels, cfg.block)
