"""A criterion's weighted terms: what its "loss" is the sum of, kept apart so that a
loss balancer (engine/balance.py) can re-weight, clip or align them.

Both criteria build their "loss" with `weighted_sum` over the same terms they hand out,
so a balancer that leaves every term alone gets the criterion's total bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor


class WeightedTerm(NamedTuple):
    """One component of a criterion's total: `weight * value`.

    weight: the configured multiplier (e.g. LossConfig.box_weight), a Python float.
    value:  the component as a differentiable float32 scalar (its detached copy is the
            criterion's "loss_xxx" entry).
    """

    weight: float
    value: Tensor


# Component name ("loss_cls", "loss_box", ...) -> term, in the order the criterion sums them.
LossTerms = Mapping[str, WeightedTerm]


def weighted_sum(terms: LossTerms) -> Tensor:
    """sum_i weight_i * value_i, folded left to right in the terms' order.

    The order and the form (`total + weight * value`, the weight a Python float) are what
    the criteria always computed, so their totals did not change when they moved here:
    float addition is not associative, and runs are compared bit for bit.
    """
    total: Tensor | None = None
    for weight, value in terms.values():
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError("weighted_sum needs at least one term")
    return total
