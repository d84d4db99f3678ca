"""Backbones: images -> feature maps P3, P4, P5 (strides 8, 16, 32).

Every backbone is an nn.Module with `out_channels: tuple[int, int, int]`, `strides =
(8, 16, 32)` and `forward(x [B, 3, H, W]) -> (P3, P4, P5)`, P_i of shape
[B, out_channels[i], H / stride, W / stride] (H and W multiples of 32). Each family
lives in its own file; its builder takes the validated `BackboneConfig` (`args` already
checked and filled by the family's schema, `norm` one of bn / gn / frozen_bn).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from detpact.config import BackboneConfig
from detpact.models.backbones.convnext import convnext_tiny
from detpact.models.backbones.cspdarknet import CSPDarknet, cspdarknet, scale_channels, scale_depth
from detpact.models.backbones.cspresnet import cspresnet
from detpact.models.backbones.resnet import resnet18, resnet34, resnet50
from detpact.models.backbones.tiny_cnn import tiny_cnn

BACKBONES: dict[str, Callable[[BackboneConfig], nn.Module]] = {
    "tiny_cnn": tiny_cnn,
    "cspdarknet": cspdarknet,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "convnext_tiny": convnext_tiny,
    "cspresnet": cspresnet,
}

__all__ = ["BACKBONES", "CSPDarknet", "build_backbone", "scale_channels", "scale_depth"]


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.name not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.name!r}; choices: {', '.join(BACKBONES)}")
    return BACKBONES[cfg.name](cfg)
