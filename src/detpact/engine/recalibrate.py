"""BatchNorm recalibration: running statistics recomputed for the weights being evaluated.

During training a BatchNorm layer's running statistics are a moving average over the raw
model as it moved, while validation, checkpoints and export use the EMA weights, which
lag it. Recalibrating means running the evaluated model over training images, without
gradients, so that each layer's statistics become the exact mean over those batches
(PreciseBN, Wu & Johnson 2021). The images are those of the epoch just trained, in its
augmentation (`transform: train`), or plainly letterboxed (`transform: val`). Training
images only: the validation split stays unseen. docs/recipe.md has the measurements.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from detpact.engine.evaluate import prepare_images
from detpact.engine.runtime import autocast

log = logging.getLogger(__name__)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, device: torch.device, amp: str,
                          channels_last: bool) -> None:
    """Replace the running mean / variance of every BatchNorm layer of `model`, in place, by
    their average over the batches of `loader`. Everything else is left as it was: the
    weights, each layer's momentum and batch counter (the warm start of
    `WarmStartBatchNorm2d` reads it), and the module's train / eval mode."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    started = time.perf_counter()
    was_training = model.training
    kept = [(layer.momentum, layer.num_batches_tracked.clone()) for layer in layers]
    model.eval()  # only the normalisation layers gather statistics
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: batch n weighs 1 / n
        layer.train()
    images_seen = 0
    for images, _ in loader:
        with autocast(device, amp):
            model(prepare_images(images, device, channels_last))
        images_seen += len(images)
    for layer, (momentum, batches) in zip(layers, kept):
        layer.momentum = momentum
        layer.num_batches_tracked.copy_(batches)
    model.train(was_training)
    log.debug("BatchNorm statistics of %d layers recomputed on %d training images in %.1f s",
              len(layers), images_seen, time.perf_counter() - started)


def recalibration_indices(num_train: int, num_images: int) -> list[int]:
    """`num_images` training images spread evenly over the split (all of a smaller one), so
    that a split ordered by folder or class still gives a representative sample."""
    if num_images >= num_train:
        return list(range(num_train))
    return [i * num_train // num_images for i in range(num_images)]


class EpochSampler(Sampler):
    """Fixed training images as the dataset keys of one epoch, `(epoch, index)`: set
    `epoch` before iterating to get that epoch's augmentation of them."""

    def __init__(self, indices: list[int]):
        self.indices = indices
        self.epoch = 0

    def __iter__(self):
        return ((self.epoch, index) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)
