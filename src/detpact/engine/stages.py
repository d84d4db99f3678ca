"""Training stages (train.stages): parts of the model frozen, and the learning rate scaled,
for a number of optimizer steps each (e.g. the backbone frozen for the first 500 steps).

The active stage is a pure function of the step, so a resume inside any stage trains on
exactly as the uninterrupted run did. A part frozen by a stage keeps its place in the
optimizer; it just gets no gradient, so the optimizer leaves it (and its weight decay)
alone until the stage ends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from detpact.config.train import StageConfig
from detpact.errors import DetpactError

log = logging.getLogger(__name__)


def stage_at(stages: Sequence[StageConfig], steps_done: int) -> int | None:
    """The index of the stage that the next optimizer step (after `steps_done`) belongs to;
    None after the last stage (everything trains, at the schedule's learning rate)."""
    end = 0
    for index, stage in enumerate(stages):
        end += stage.steps
        if steps_done < end:
            return index
    return None


class StageSwitch:
    """Applies the active stage's freezing to `model` when the stage changes."""

    def __init__(self, model: nn.Module, stages: Sequence[StageConfig]):
        self.stages = list(stages)
        self.params = dict(model.named_parameters())
        # What trains outside every stage (model.freeze already applied).
        self.trainable = {name for name, p in self.params.items() if p.requires_grad}
        self.current: int | None = -1  # nothing applied yet
        for index, stage in enumerate(self.stages):
            for prefix in stage.freeze:
                if not any(_under(name, prefix) for name in self.params):
                    parts = sorted({name.split(".")[0] for name in self.params})
                    raise DetpactError(f"train.stages[{index}].freeze: no parameter of the model is under "
                                       f"{prefix!r}. Name a module, e.g. one of {parts} or a sub-module such as "
                                       f"'{parts[0]}.<child>'.")

    def update(self, steps_done: int) -> float:
        """Enter the stage of the next step if it changed; returns its lr multiplier."""
        index = stage_at(self.stages, steps_done)
        if index != self.current:
            frozen = self.stages[index].freeze if index is not None else []
            for name, param in self.params.items():
                param.requires_grad_(name in self.trainable and not any(_under(name, p) for p in frozen))
            log.info("step %d: %s", steps_done + 1, f"stage {index} ({', '.join(frozen) or 'nothing'} frozen, lr x "
                     f"{self.stages[index].lr_mult})" if index is not None else "the stages are over: everything trains")
            self.current = index
        return self.stages[index].lr_mult if index is not None else 1.0


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
