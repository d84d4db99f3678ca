"""The detection Dataset (sample i of epoch e, augmented deterministically) and its DataLoader."""

from __future__ import annotations

import os
import signal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detpact.config import AugmentConfig, DataConfig
from detpact.data.augment import Source, augment_sample, draw_params
from detpact.data.cache import ImageCache
from detpact.data.formats import Sample
from detpact.data.transforms import letterbox_boxes, letterbox_placement, pad_to_canvas, resized_shape, sample_rng
from detpact.errors import DetpactError


class DetectionDataset(Dataset):
    """Letterboxed samples; training samples go through the augmentation pipeline (augment.py).

    `dataset[(epoch, index)]` draws its random transforms from (seed, epoch, index);
    `dataset[index]` is the same as epoch 0 (used for evaluation, where `train` is False
    and nothing is random). Returns (image uint8 [3, S, S], target) where target holds
    "boxes" [N, 4] float32 xyxy canvas pixels, "labels" [N] int64, "image_id" int,
    "orig_size" (h, w), "scale" and "pad" (x, y) of the image's letterbox (evaluation
    maps predictions back with them; for an augmented training sample they describe
    the unaugmented letterbox). `cache` serves the decoded, resized images. From epoch
    `mosaic_until` on, training samples are drawn without mosaic (close_mosaic_epochs).
    """

    def __init__(self, samples: list[Sample], image_size: int, train: bool, seed: int = 0,
                 augment: AugmentConfig | None = None, cache: ImageCache | None = None,
                 mosaic_until: int | None = None):
        self.samples = samples
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.augment = augment or AugmentConfig()
        self.closed_augment = self.augment.model_copy(update={"mosaic_p": 0.0})
        self.mosaic_until = mosaic_until
        self.cache = cache or ImageCache("none")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        if self.train:
            augment = self.augment_at(epoch)
            params = draw_params(sample_rng(self.seed, epoch, index), augment, self.image_size, index, len(self))
            sources = [self.source(i) for i in (index, *params.partners)]
            canvas, boxes, labels = augment_sample(params, sources, self.image_size, augment)
            placement = sources[0].placement
        else:
            source = self.source(index)
            canvas = pad_to_canvas(source.pixels, source.placement, self.image_size)
            boxes, labels, placement = source.boxes, source.labels, source.placement
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": index,
            "orig_size": (sample.height, sample.width),
            "scale": placement.scale,
            "pad": (placement.pad_x, placement.pad_y),
        }
        return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))), target

    def augment_at(self, epoch: int) -> AugmentConfig:
        """The augmentation of `epoch`: mosaic switched off from `mosaic_until` on."""
        closed = self.mosaic_until is not None and epoch >= self.mosaic_until
        return self.closed_augment if closed else self.augment

    def source(self, index: int) -> Source:
        """Sample `index` resized for the letterbox, with its training boxes on the canvas."""
        sample = self.samples[index]
        pixels = self.cache.load(sample.image_path, self.image_size)
        if pixels.shape[1::-1] != resized_shape(sample.width, sample.height, self.image_size):
            raise DetpactError(
                f"Image {sample.image_path} is no longer {sample.width}x{sample.height} as when the dataset was "
                "read (it changed during the run): restore it, or start again so that it is read afresh."
            )
        placement = letterbox_placement(sample.width, sample.height, self.image_size)
        # Ignore regions (crowd, difficult) are not trained on: for now they are simply
        # background, as in most YOLO-style trainers. Evaluation still ignores them.
        keep = slice(None) if sample.ignore is None else ~sample.ignore
        return Source(pixels, placement, letterbox_boxes(sample.boxes[keep], placement), sample.labels[keep])


def resolve_num_workers(setting: int | str) -> int:
    """`data.num_workers`, with "auto" resolved for this machine."""
    if setting != "auto":
        return int(setting)
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus // 2)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler: Sampler | None = None,
                drop_last: bool = False) -> DataLoader:
    """The one way detpact builds a DataLoader (training and evaluation).

    Results never depend on `num_workers`: samples are seeded per (seed, epoch, index),
    not per worker. The loader draws its worker base seed from its own generator, so
    iterating it leaves the global torch RNG alone; workers ignore SIGINT/SIGTERM so that
    the main process can stop gracefully (a Ctrl-C reaches the whole process group).
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      collate_fn=collate, num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_leave_stop_signals_to_main if num_workers > 0 else None)


def eval_loader(samples: list[Sample], cfg: DataConfig, batch_size: int,
                cache: ImageCache | None = None, sampler: Sampler | None = None) -> DataLoader:
    """Batches of a split in order (or of the samples `sampler` picks), untransformed but for
    the letterbox (validation, eval, BatchNorm recalibration)."""
    dataset = DetectionDataset(samples, cfg.image_size, train=False, cache=cache)
    return make_loader(dataset, batch_size, resolve_num_workers(cfg.num_workers), sampler)


def _leave_stop_signals_to_main(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
