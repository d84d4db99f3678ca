"""YOLOv8/11-style CSP-Darknet (`cspdarknet`, sizes n/s/m/l/x)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from detpact.config import BackboneConfig, CSPDarknetArgs
from detpact.models.backbones.norms import replace_batchnorm
from detpact.models.layers import C2PSA, SPPF, C3k2, ConvBNAct, CSPBlock

# Channels and block repeats of the full-size network; width_mult and depth_mult
# scale them (0.25 / 0.33 gives a ~1.5 M-parameter detector).
BASE_CHANNELS = (64, 128, 256, 512, 1024)
BASE_DEPTHS = (3, 6, 6, 3)


def scale_channels(c: int, width_mult: float) -> int:
    """Scaled channel count, rounded up to a multiple of 8 (at least 8)."""
    return max(8, int(math.ceil(c * width_mult / 8) * 8))


def scale_depth(n: int, depth_mult: float) -> int:
    return max(1, round(n * depth_mult))


class CSPDarknet(nn.Module):
    """YOLOv8/11-style CSP-Darknet: a stride-2 stem, then four stride-2 CSP stages, SPPF and
    optionally C2PSA attention on P5.

    forward(x [B, 3, H, W]) -> (P3, P4, P5): [B, out_channels[i], H / s, W / s] for s = 8, 16, 32.
    """

    strides = (8, 16, 32)

    def __init__(self, args: CSPDarknetArgs | dict):
        super().__init__()
        args = CSPDarknetArgs.model_validate(args) if isinstance(args, dict) else args
        c = [scale_channels(x, args.width_mult) for x in BASE_CHANNELS]
        n = [scale_depth(x, args.depth_mult) for x in BASE_DEPTHS]

        def csp(channels: int, repeats: int, deep: bool) -> nn.Module:
            if args.block == "c2f":
                return CSPBlock(channels, channels, repeats)
            # YOLO11: quarter-width hidden channels in the shallow stages, C3k blocks in the deep ones.
            return C3k2(channels, channels, repeats, c3k=deep, expand=0.5 if deep else 0.25)

        self.stem = ConvBNAct(3, c[0], 3, 2)  # stride 2
        self.stage2 = nn.Sequential(ConvBNAct(c[0], c[1], 3, 2), csp(c[1], n[0], deep=False))  # 4
        self.stage3 = nn.Sequential(ConvBNAct(c[1], c[2], 3, 2), csp(c[2], n[1], deep=False))  # 8
        self.stage4 = nn.Sequential(ConvBNAct(c[2], c[3], 3, 2), csp(c[3], n[2], deep=True))  # 16
        p5 = [ConvBNAct(c[3], c[4], 3, 2), csp(c[4], n[3], deep=True), SPPF(c[4], c[4])]
        if args.attention:
            p5.append(C2PSA(c[4]))
        self.stage5 = nn.Sequential(*p5)  # 32
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.stage2(self.stem(x))
        p3 = self.stage3(x)
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        return p3, p4, p5


def cspdarknet(cfg: BackboneConfig) -> CSPDarknet:
    # The shared YOLO blocks (layers.py) are built with BatchNorm; other norms replace it.
    return replace_batchnorm(CSPDarknet(cfg.args), cfg.norm)
