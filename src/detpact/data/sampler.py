"""A sampler whose order is a pure function of (seed, epoch) and that can start mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) keys so the dataset can seed transforms per (epoch, index).

    `set_epoch(epoch, start)` selects the epoch's permutation and skips its first
    `start` entries without loading them: resuming mid-epoch costs nothing.

    With several training processes, rank r of `world_size` takes every world_size-th
    entry from r on: its k-th batch of B and the other ranks' k-th batches together are
    the k-th batch of B x world_size a single process would draw. The tail that cannot
    give every rank an entry is left out, so all ranks see the same number of batches.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        end = self.start + len(self) * self.world_size
        for index in self.order(self.epoch)[self.start + self.rank : end : self.world_size]:
            yield self.epoch, int(index)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start) // self.world_size

    def state_at(self, epoch: int, start: int) -> dict[str, int]:
        """The sampler's state for a checkpoint whose next batch begins at `start` of `epoch`
        (the loader prefetches, so only the loop knows how far training has consumed)."""
        return {"seed": self.seed, "num_samples": self.num_samples, "shuffle": int(self.shuffle),
                "epoch": epoch, "start": start}
