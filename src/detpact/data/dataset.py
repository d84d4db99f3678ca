"""The detection Dataset and the builder that turns `cfg.data` into train/val splits."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detpact.config import DataConfig
from detpact.data.fingerprint import dataset_fingerprint
from detpact.data.formats import Sample, open_rgb, read_class_names, read_yolo_split
from detpact.data.synthetic import ensure_synthetic
from detpact.data.transforms import hflip, letterbox, letterbox_boxes, sample_rng
from detpact.errors import DetpactError


class DetectionDataset(Dataset):
    """Letterboxed samples; training samples are randomly flipped.

    `dataset[(epoch, index)]` seeds its random transforms from (seed, epoch, index);
    `dataset[index]` is the same as epoch 0 (used for evaluation, where `train` is False
    and nothing is random). Returns (image uint8 [3, S, S], target) where target holds
    "boxes" [N, 4] float32 xyxy canvas pixels, "labels" [N] int64, "image_id" int,
    "orig_size" (h, w), "scale" and "pad" (x, y) of the letterbox.
    """

    def __init__(self, samples: list[Sample], image_size: int, train: bool, seed: int = 0, hflip_p: float = 0.5):
        self.samples = samples
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.hflip_p = hflip_p

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        canvas, placement = letterbox(open_rgb(sample.image_path), self.image_size)
        # Ignore regions (crowd, difficult) are not trained on: for now they are simply
        # background, as in most YOLO-style trainers. Evaluation still ignores them.
        keep = slice(None) if sample.ignore is None else ~sample.ignore
        boxes = letterbox_boxes(sample.boxes[keep], placement)
        labels = sample.labels[keep]
        if self.train:
            rng = sample_rng(self.seed, epoch, index)
            if rng.random() < self.hflip_p:
                canvas, boxes = hflip(canvas, boxes)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": index,
            "orig_size": (sample.height, sample.width),
            "scale": placement.scale,
            "pad": (placement.pad_x, placement.pad_y),
        }
        return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))), target


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


def eval_loader(samples: list[Sample], cfg: DataConfig, batch_size: int) -> DataLoader:
    """Batches of a split in order, untransformed but for the letterbox (validation, eval)."""
    dataset = DetectionDataset(samples, cfg.image_size, train=False)
    return make_loader(dataset, batch_size, resolve_num_workers(cfg.num_workers))


def _leave_stop_signals_to_main(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


@dataclass
class DatasetSplits:
    """Everything the run needs to know about its data."""

    root: Path
    mode: str  # "real" or "synthetic"
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    fingerprint: str


def build_datasets(cfg: DataConfig, cache_dir: Path) -> DatasetSplits:
    """Resolve the dataset folder (generating the synthetic one if named), read both splits.

    cache_dir: where the synthetic dataset goes when `data.path` is not set.
    """
    if cfg.format == "synthetic":
        spec = cfg.synthetic
        root = Path(cfg.path) if cfg.path else cache_dir / f"synthetic-{_synthetic_key(cfg)}"
        ensure_synthetic(
            root, num_train=spec.num_train, num_val=spec.num_val, image_size=spec.image_size,
            seed=spec.seed, max_objects=spec.max_objects,
        )
        mode = "synthetic"
    else:
        root = Path(cfg.path)
        if not root.is_dir():
            raise DetpactError(
                f"Dataset folder not found: {root} (data.path). Point data.path at your dataset "
                "folder; detpact never substitutes built-in data for a missing dataset "
                "(use data.format: synthetic to train on the built-in shapes explicitly)."
            )
        mode = "real"
    class_names = read_class_names(root, cfg.classes)
    train = read_yolo_split(root, cfg.train_split, len(class_names))
    val = read_yolo_split(root, cfg.val_split, len(class_names))
    fingerprint = dataset_fingerprint(root, [(cfg.train_split, train), (cfg.val_split, val)], class_names)
    return DatasetSplits(root, mode, class_names, train, val, fingerprint)


def _synthetic_key(cfg: DataConfig) -> str:
    spec = json.dumps(cfg.synthetic.model_dump(), sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]
