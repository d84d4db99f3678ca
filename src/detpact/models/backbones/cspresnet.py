"""PP-YOLOE's CSPResNet (`cspresnet`): CSP stages of RepVGG-style residual blocks with
effective squeeze-excitation (PaddleDetection's `ppdet/modeling/backbones/cspresnet.py`).

width_mult / depth_mult scale channels (64, 128, 256, 512, 1024) and blocks (3, 6, 6, 3):
PP-YOLOE s/m/l/x are 0.50/0.33, 0.75/0.67, 1.00/1.00, 1.25/1.33. The s size gives
P3/P4/P5 of 128/256/512 channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detpact.config import BackboneConfig
from detpact.config.model import CSPResNetArgs
from detpact.models.backbones.norms import make_norm
from detpact.models.backbones.stages import pyramid

BASE_CHANNELS = (64, 128, 256, 512, 1024)
BASE_DEPTHS = (3, 6, 6, 3)


class ConvNormAct(nn.Module):
    """k x k conv (no bias, 'same' padding) -> norm -> SiLU (or no activation)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, norm: str, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = make_norm(norm, c_out)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class RepVGGBlock(nn.Module):
    """SiLU(norm(conv3x3(x)) + norm(conv1x1(x))): two branches a deployment could fuse into one 3x3 conv."""

    def __init__(self, c: int, norm: str):
        super().__init__()
        self.conv1 = ConvNormAct(c, c, 3, 1, norm, act=False)
        self.conv2 = ConvNormAct(c, c, 1, 1, norm, act=False)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class BasicBlock(nn.Module):
    """x + RepVGG(conv3x3(x)): the residual block of a CSPResStage. [B, C, H, W] -> same."""

    def __init__(self, c: int, norm: str):
        super().__init__()
        self.conv1 = ConvNormAct(c, c, 3, 1, norm)
        self.conv2 = RepVGGBlock(c, norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class EffectiveSE(nn.Module):
    """Effective squeeze-excitation (CenterMask): x * hardsigmoid(conv1x1(mean over H, W of x))."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        self.act = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.act(self.fc(x.mean((2, 3), keepdim=True)))  # [B, C, 1, 1] weights


class CSPResStage(nn.Module):
    """A 3x3 stride-2 conv to the mid width (c_in + c_out) / 2, then a cross-stage-partial split:
    half through a 1x1 conv, half through a 1x1 conv and n BasicBlocks; concatenated,
    re-weighted by EffectiveSE and projected to c_out. [B, c_in, H, W] -> [B, c_out, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int, n: int, norm: str):
        super().__init__()
        c_mid = (c_in + c_out) // 2
        self.conv_down = ConvNormAct(c_in, c_mid, 3, 2, norm)
        self.conv1 = ConvNormAct(c_mid, c_mid // 2, 1, 1, norm)
        self.conv2 = ConvNormAct(c_mid, c_mid // 2, 1, 1, norm)
        self.blocks = nn.Sequential(*(BasicBlock(c_mid // 2, norm) for _ in range(n)))
        self.attn = EffectiveSE(2 * (c_mid // 2))
        self.conv3 = ConvNormAct(2 * (c_mid // 2), c_out, 1, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_down(x)
        y = torch.cat([self.conv1(x), self.blocks(self.conv2(x))], dim=1)
        return self.conv3(self.attn(y))


class CSPResNet(nn.Module):
    """A stride-2 stem of three 3x3 convs (PP-YOLOE's large stem), then four stride-2
    CSPResStages at strides 4, 8, 16, 32; P3, P4, P5 are the last three.

    forward(x [B, 3, H, W]) -> (P3, P4, P5): [B, out_channels[i], H / s, W / s] for s = 8, 16, 32.
    """

    strides = (8, 16, 32)

    def __init__(self, args: CSPResNetArgs | dict, norm: str = "bn"):
        super().__init__()
        args = CSPResNetArgs.model_validate(args) if isinstance(args, dict) else args
        c = [max(round(x * args.width_mult), 1) for x in BASE_CHANNELS]
        n = [max(round(x * args.depth_mult), 1) for x in BASE_DEPTHS]
        self.stem = nn.Sequential(
            ConvNormAct(3, c[0] // 2, 3, 2, norm),
            ConvNormAct(c[0] // 2, c[0] // 2, 3, 1, norm),
            ConvNormAct(c[0] // 2, c[0], 3, 1, norm),
        )
        self.stages = nn.ModuleList(CSPResStage(c[i], c[i + 1], n[i], norm) for i in range(4))
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return pyramid(self.stem(x), self.stages)


def cspresnet(cfg: BackboneConfig) -> CSPResNet:
    return CSPResNet(cfg.args, cfg.norm)
