"""Multi-scale training: each optimizer step trains at its own canvas size.

The size of step s is a pure function of (seed, s), drawn uniformly from
[S * (1 - fraction), S * (1 + fraction)] and rounded to a multiple of the largest stride,
so a resumed run trains at the same sizes. The batch (already letterboxed to S x S) is
resized as a whole with its boxes, as YOLO trainers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

STRIDE = 32


@dataclass(frozen=True)
class MultiScale:
    seed: int
    image_size: int
    fraction: float

    def size_at(self, step: int) -> int:
        """Canvas size of optimizer step `step` (a multiple of 32, at least 32)."""
        rng = np.random.default_rng([self.seed, step, 0x5CA1E])
        size = rng.uniform(self.image_size * (1 - self.fraction), self.image_size * (1 + self.fraction))
        return max(STRIDE, int(round(size / STRIDE)) * STRIDE)


def rescale_batch(images: torch.Tensor, targets: list[dict], size: int) -> tuple[torch.Tensor, list[dict]]:
    """images float [B, 3, S, S] and their targets (boxes in S-canvas pixels) -> size x size."""
    if images.shape[-1] == size:
        return images, targets
    factor = size / images.shape[-1]
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return resized, [{**t, "boxes": t["boxes"] * factor} for t in targets]
