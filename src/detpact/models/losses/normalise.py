"""The divisor of the detection losses: how many positives (or boxes) a batch holds.

Each criterion divides its summed losses by it, so that the loss scale does not depend
on how many objects a batch holds. A single process takes its batch's own count (at
least 1); several training processes share one count over the global batch
(engine/distributed.py: `global_normaliser`), so that their averaged gradients equal
those of one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Normaliser = Callable[[Tensor], Tensor]


def local_normaliser(total: Tensor) -> Tensor:
    """This batch's count, at least 1 (a batch without objects)."""
    return total.clamp(min=1.0)
