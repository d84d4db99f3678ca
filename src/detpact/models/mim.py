"""Masked-image modelling (MIM): a light decoder that reconstructs masked patches of the
input from the backbone's P3 features (`model.mim_decoder`).

Trained with the detector (its weighted loss logged as `loss_mim`), it gives test-time
training an objective that needs no labels (robustness/ttt, preset mim_safe): on a test
batch, the backbone's normalisation layers adapt so that the masked patches are
reconstructed better. The decoder is no part of `Detector.forward`, so detection,
evaluation and the exported model never run it.

The flow for one batch of images [B, 3, H, W] in [0, 1]:

    mask = patch_mask(B, H, W, generator)                 # [B, 1, H, W] bool, MASK_RATIO of the patches
    masked = where(mask, FILL, images)
    p3 = backbone(masked)[0]                              # [B, C3, H / 8, W / 8]
    recon = decoder(p3)                                   # [B, 3, H, W]
    loss = mean over masked pixels of (recon - images)^2
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

PATCH = 16  # side of a masked square, in input pixels (P3's stride is 8: two cells)
MASK_RATIO = 0.5  # the fraction of patches masked
FILL = 0.5  # the value of masked pixels (mid-grey)
STRIDE = 8  # P3's stride: one decoder output cell covers STRIDE x STRIDE pixels


class MIMDecoder(nn.Module):
    """P3 features [B, C, H / 8, W / 8] -> pixels [B, 3, H, W]: a 3x3 conv, SiLU, and a 1x1
    conv to 3 x 8 x 8 values per cell, unfolded by pixel shuffle."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 3 * STRIDE * STRIDE, 1)

    def forward(self, p3: Tensor) -> Tensor:
        return F.pixel_shuffle(self.out(F.silu(self.conv(p3))), STRIDE)


def patch_mask(batch: int, height: int, width: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """[B, 1, H, W] bool: PATCH x PATCH squares, each masked with probability MASK_RATIO
    (drawn from `generator` on the CPU, so the same generator state gives the same mask anywhere)."""
    cells = torch.rand(batch, 1, -(-height // PATCH), -(-width // PATCH), generator=generator) < MASK_RATIO
    mask = cells.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)[..., :height, :width]
    return mask.to(device)


def reconstruction_loss(backbone: nn.Module, decoder: nn.Module, images: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error of the reconstructed pixels under `mask` (float32 scalar), for
    images [B, 3, H, W] in [0, 1]; the backbone sees the masked images."""
    masked = torch.where(mask, torch.full_like(images, FILL), images)
    recon = decoder(backbone(masked)[0]).float()
    error = (recon - images.float()).square() * mask  # [B, 3, H, W]
    return error.sum() / (mask.sum() * images.shape[1]).clamp(min=1)


@contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """Inside: every BatchNorm layer of `module` in training mode normalises with the
    batch's statistics and leaves its running statistics (and batch count) as they were.

    MIM's extra forward on masked images must not move the statistics the detector is
    evaluated with.
    """
    saved = []
    for layer in module.modules():
        if isinstance(layer, _BatchNorm) and layer.running_mean is not None:
            count = layer.num_batches_tracked.clone() if layer.num_batches_tracked is not None else None
            saved.append((layer, layer.running_mean, layer.running_var, count))
            layer.running_mean, layer.running_var = None, None
    try:
        yield
    finally:
        for layer, mean, var, count in saved:
            layer.running_mean, layer.running_var = mean, var
            if count is not None:
                layer.num_batches_tracked.copy_(count)


class MIMObjective:
    """The training loss of `model.mim_decoder`: weight x reconstruction_loss, with masks
    drawn from a generator seeded by (seed, step, micro-batch), so that a resumed run
    masks exactly as the uninterrupted one."""

    def __init__(self, weight: float, seed: int):
        self.weight, self.seed = weight, seed

    def loss(self, model: nn.Module, images: Tensor, step: int, micro: int) -> Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + micro)
        mask = patch_mask(images.shape[0], images.shape[2], images.shape[3], generator, images.device)
        with batch_statistics_only(model.backbone):
            return self.weight * reconstruction_loss(model.backbone, model.mim_decoder, images, mask)
