"""What the speed benches share: the same training batches for every variant, and the
variants timed in alternating blocks after warm-up (this machine is noisy: a ratio is
taken per block, then its median). Imported by the bench scripts run as
`python bench/<name>.py`, which puts this folder on the import path."""

from __future__ import annotations

import time
from collections.abc import Callable

from detpact.config import Config
from detpact.data.build import DatasetSplits
from detpact.data.dataset import DetectionDataset, collate


def training_batches(cfg: Config, data: DatasetSplits, count: int) -> list:
    """`count` augmented training batches of cfg.train.batch_size (epoch 0, in order)."""
    dataset = DetectionDataset(data.train, cfg.data.image_size, train=True)
    size = cfg.train.batch_size
    return [collate([dataset[(0, i)] for i in range(j * size, (j + 1) * size)]) for j in range(count)]


def timed(variants: dict[str, Callable], batches: list, blocks: int) -> dict[str, list[float]]:
    """Seconds per call of each variant (called as run(images, targets)), per block, the
    variants alternating block by block after two warm-up calls each."""
    for run in variants.values():
        for images, targets in batches[:2]:
            run(images, targets)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(blocks):
        for name, run in variants.items():
            started = time.perf_counter()
            for images, targets in batches:
                run(images, targets)
            times[name].append((time.perf_counter() - started) / len(batches))
    return times
