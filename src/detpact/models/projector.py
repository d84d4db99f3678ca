"""Projector: a 1x1 conv + norm per pyramid level, to one common width (d_model)."""

from __future__ import annotations

from torch import Tensor, nn

from detpact.models.layers import WarmStartBatchNorm2d


class Projector(nn.Module):
    """feats: maps with `in_channels` channels -> the same maps with `d_model` channels each."""

    def __init__(self, in_channels: tuple[int, ...], d_model: int):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 1, bias=False), WarmStartBatchNorm2d(d_model)) for c in in_channels)
        self.out_channels = tuple(d_model for _ in in_channels)

    def forward(self, feats: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(level(x) for level, x in zip(self.levels, feats))


class NoProjector(nn.Identity):
    """The neck's maps unchanged (no model.projector.d_model)."""

    def __init__(self, in_channels: tuple[int, ...]):
        super().__init__()
        self.out_channels = tuple(in_channels)
