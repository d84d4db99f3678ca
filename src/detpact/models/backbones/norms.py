"""The normalisation layers a backbone can use: bn, gn or frozen_bn (`model.backbone.norm`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detpact.models.layers import WarmStartBatchNorm2d

NORMS = ("bn", "gn", "frozen_bn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Always normalises with the running statistics, in train and eval mode alike, and has
    no trainable parameters: everything is a buffer. The buffers are exactly
    BatchNorm2d's (weight, bias, running_mean, running_var, num_batches_tracked), so the
    state dict of a BatchNorm2d layer, e.g. a torchvision weight file, loads unchanged.
    x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        # Never updated; kept so that state-dict keys match BatchNorm2d's.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        """The frozen copy of `bn`: its statistics and affine (ones / zeros where it has none)."""
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        # One multiply-add (as torchvision's FrozenBatchNorm2d): exports to ONNX as Mul + Add.
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        shift = self.bias - self.running_mean * scale  # [C]
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of `channels` that is at most `max_groups` (32 for 64 channels, 24 for 72)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def make_norm(kind: str, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    """A normalisation layer over [B, channels, H, W]: bn (trained BatchNorm, running
    statistics averaged with `momentum`), gn (GroupNorm, 32 groups or the largest divisor
    of `channels` below that) or frozen_bn (fixed statistics and affine)."""
    if kind == "bn":
        return WarmStartBatchNorm2d(channels, eps=eps, momentum=momentum)
    if kind == "gn":
        return nn.GroupNorm(group_count(channels), channels, eps=eps)
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choices: {', '.join(NORMS)}")


def replace_batchnorm(module: nn.Module, kind: str) -> nn.Module:
    """Swap every nn.BatchNorm2d in `module` (in place) for a `kind` layer with the same
    channels and eps, and return `module`. frozen_bn copies the statistics and affine of
    the layer it replaces; gn starts from the identity affine (GroupNorm has no statistics
    to copy). bn leaves the module as it is."""
    if kind == "bn":
        return module
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choices: {', '.join(NORMS)}")
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = FrozenBatchNorm2d.from_batchnorm(child) if kind == "frozen_bn" else make_norm(kind, child.num_features, child.eps)
            setattr(module, name, new)
        else:
            replace_batchnorm(child, kind)
    return module
