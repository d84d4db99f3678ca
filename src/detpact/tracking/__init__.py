"""Experiment tracking (the `tracking` extra): TensorBoard event files and MLflow runs.

    base.py         the Tracker interface, the guard that keeps a failing tracker from
                    stopping training, scalar names shared by the trackers
    tensorboard.py  event files under the run folder
    mlflow.py       an MLflow run: params, metrics, tags, artifacts, model registry
    session.py      check before training, start on rank 0, finish after the export
"""

from detpact.tracking.base import NO_TRACKER, Tracker, TrackerSet
from detpact.tracking.session import check_tracking, finish_tracking, start_tracking

__all__ = ["NO_TRACKER", "Tracker", "TrackerSet", "check_tracking", "finish_tracking", "start_tracking"]
