"""TensorBoard event files under the run folder (`logging.tensorboard: true`).

Scalars: `train/<field>` per optimizer step (loss, its components, lr, grad_norm, ...)
and `val/<metric>` per validation (map50_95, per_class/<name>, operating_point/...),
the same names the MLflow tracker uses. `tensorboard --logdir runs/` shows every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detpact.run.contract import RunDir
from detpact.tracking.base import scalars


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, logdir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (the extra)

        self.logdir = logdir
        # A resumed run retrains the steps after its last checkpoint (start_step): purge_step
        # tells TensorBoard to drop the earlier session's events from the first retrained step on.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=start_step + 1 if start_step else None)

    def log_step(self, step: int, record: Mapping[str, Any]) -> None:
        for tag, value in scalars({k: v for k, v in record.items() if k != "step"}, "train"):
            self.writer.add_scalar(tag, value, step)

    def log_validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        for tag, value in scalars({k: v for k, v in metrics.items() if k != "step"}, "val"):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a validation is worth seeing at once

    def finish(self, run: RunDir, status: str) -> None:
        self.writer.close()

    def describe(self) -> dict[str, Any]:
        return {"logdir": str(self.logdir)}
