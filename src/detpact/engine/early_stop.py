"""Early stopping: end the run when a validation metric has stopped improving.

A validation improves when its metric beats the best seen so far by more than
`min_delta`; after `patience` validations in a row without improvement the run ends
(after the checkpoint of that step is written). The state is a few numbers, saved in
every checkpoint, so a resumed run stops at the same validation as one left alone, and
a run that stopped early stays stopped when resumed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from detpact.config import EarlyStopConfig

log = logging.getLogger(__name__)


@dataclass
class EarlyStopping:
    cfg: EarlyStopConfig
    best: float | None = None  # the metric's best value by more than min_delta
    stale: int = 0  # validations since it improved
    stopped: bool = False

    def update(self, metrics: dict[str, Any]) -> bool:
        """Record a validation's metrics; True when the run should end now."""
        if self.cfg.patience is None:
            return False
        value = metrics.get(self.cfg.metric)
        value = -1.0 if value is None else float(value)  # a split without ground truth never improves
        if self.best is None or value > self.best + self.cfg.min_delta:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        self.stopped = self.stale >= self.cfg.patience
        if self.stopped:
            log.info("early stopping: val %s has not improved by more than %g for %d validations (best %.4f)",
                     self.cfg.metric, self.cfg.min_delta, self.stale, self.best)
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "cfg"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale, self.stopped = state["best"], state["stale"], state["stopped"]
