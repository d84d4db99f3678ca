"""What the plain staged backbones share: four stride-2 stages after a stem, of which
the last three give P3, P4 and P5."""

from __future__ import annotations

from torch import Tensor, nn


def pyramid(x: Tensor, stages: nn.ModuleList) -> tuple[Tensor, Tensor, Tensor]:
    """Run `x` (the stem's output, stride 2) through the four stages -> (P3, P4, P5)."""
    outs = []
    for stage in stages:
        x = stage(x)
        outs.append(x)
    p3, p4, p5 = outs[1:]
    return p3, p4, p5
