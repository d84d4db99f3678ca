"""Where a run's numbers go: the metric JSONL files, status.json, the progress bar and
the experiment trackers (logging.tensorboard / logging.mlflow).

Keeps the loop body about training: it hands over each step's and each
validation's results, and the recorder writes them everywhere they belong.
"""

from __future__ import annotations

import time
from typing import Any

from detpact.engine.progress import TrainProgress
from detpact.run.contract import RunDir
from detpact.run.metrics import JsonlLog
from detpact.run.status import StatusWriter
from detpact.tracking.base import NO_TRACKER, TrackerSet

# Step statistics recorded under their own names first, or not at all.
_STEP_FIELDS = ("loss", "num_pos", "grad_norm", "images")


class Recorder:
    def __init__(self, run: RunDir, bar: TrainProgress, status_every_s: float, total_steps: int, start_step: int,
                 tracker: TrackerSet = NO_TRACKER):
        self.train_log = JsonlLog(run.train_metrics)
        self.val_log = JsonlLog(run.val_metrics)
        self.status = StatusWriter(run.status, status_every_s)
        self.bar = bar
        self.total_steps = total_steps
        self.start_step = start_step
        self.tracker = tracker  # its calls never raise: a failing tracker is dropped and reported
        self.started = self.tick = time.perf_counter()

    def step(self, step: int, epoch: int, lr: float, images: int, stats: dict | None, skipped_total: int,
             extra: dict[str, Any] | None = None) -> None:
        """Record one optimizer step (stats None = skipped as non-finite; `extra`: more
        fields, such as the train.stages entry it trained in)."""
        now = time.perf_counter()
        speed = images / max(now - self.tick, 1e-9)
        self.tick = now
        record: dict[str, Any] = {"step": step, "epoch": epoch, "lr": lr}
        record.update(extra or {})
        record.update({k: None if stats is None else stats[k] for k in ("loss", "num_pos", "grad_norm")})
        # The loss components are the criterion's (loss_cls, loss_box, ... or loss_vfl, loss_l1, ...),
        # then what loss balancing logs (box_scale, clipped/..., task_weight/...).
        record.update({k: v for k, v in (stats or {}).items() if k not in _STEP_FIELDS})
        record.update(skipped=stats is None, nonfinite_skipped=skipped_total,
                      samples_per_s=round(speed, 2), time_s=round(now - self.started, 3))
        self.train_log.write(record)
        self.tracker.log_step(step, record)
        self.bar.update(step, record["loss"], lr, speed, epoch)
        eta = (self.total_steps - step) * (now - self.started) / max(1, step - self.start_step)
        self.status.update("train", step=step, epoch=epoch, total_steps=self.total_steps,
                           loss=record["loss"], eta_s=round(eta, 1))

    def validation(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        self.val_log.write({"step": step, "epoch": epoch, **metrics})
        self.tracker.log_validation(step, {"epoch": epoch, **metrics})
        self.status.update("train", force=True,
                           last_val={k: metrics.get(k) for k in ("map50_95", "map50", "map75")})

    def phase(self, name: str, step: int, epoch: int, **fields: Any) -> None:
        self.status.update(name, force=True, step=step, epoch=epoch, **fields)

    def close(self) -> None:
        self.train_log.close()
        self.val_log.close()


class NullRecorder:
    """The recorder of ranks other than 0, which write nothing."""

    def step(self, *args: Any, **fields: Any) -> None:
        pass

    def validation(self, *args: Any, **fields: Any) -> None:
        pass

    def phase(self, *args: Any, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass
