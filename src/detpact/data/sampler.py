"""A sampler whose order is a pure function of (seed, epoch) and that can start mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) keys so the dataset can seed transforms per (epoch, index).

    `set_epoch(epoch, start)` selects the epoch's permutation and skips its first
    `start` entries without loading them: resuming mid-epoch costs nothing.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order(self.epoch)[self.start :]:
            yield self.epoch, int(index)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def state_at(self, epoch: int, start: int) -> dict[str, int]:
        """The sampler's state for a checkpoint whose next batch begins at `start` of `epoch`
        (the loader prefetches, so only the loop knows how far training has consumed)."""
        return {"seed": self.seed, "num_samples": self.num_samples, "shuffle": int(self.shuffle),
                "epoch": epoch, "start": start}
