"""The trackers of one training session (`logging.tensorboard`, `logging.mlflow`): checked
before training starts, opened on rank 0 once the run folder exists, fed by the
Recorder, and finished at the end of `detpact.train` (after the export), which records
how each fared in train_report.json under `tracking`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from detpact.config import Config, resolved_dict
from detpact.config.outputs import LoggingConfig
from detpact.errors import DetpactError, TrainingStopped
from detpact.run.atomic import atomic_write_json, read_json
from detpact.run.contract import RunDir, read_manifest, write_manifest
from detpact.tracking.base import FAILED, FINISHED, KILLED, NO_TRACKER, Tracker, TrackerSet, one_line, redact_uri

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'detpact[tracking]'"
# logging key -> the module it needs (torch's writer needs the tensorboard package).
REQUIRED_MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}


def check_tracking(cfg: LoggingConfig) -> None:
    """Refuse to start a run whose trackers cannot be imported (the `tracking` extra)."""
    for key, module in REQUIRED_MODULES.items():
        if not getattr(cfg, key):
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DetpactError(
                f"logging.{key} is on, but {key} is not installed ({one_line(exc)}). Install the tracking extra: "
                f"{EXTRA_HINT}, or turn logging.{key} off (--set logging.{key}="
                f"{'false' if key == 'tensorboard' else 'null'}).") from None


def start_tracking(cfg: Config, run: RunDir, meta: Mapping[str, Any], bundle: Mapping[str, Any] | None) -> TrackerSet:
    """The configured trackers, started (rank 0, after run_meta.json is written; `bundle`:
    the checkpoint resumed from). A tracker that fails to start is reported, not raised."""
    logging_cfg = cfg.logging
    if not logging_cfg.tensorboard and logging_cfg.mlflow is None:
        return NO_TRACKER
    trackers: list[Tracker] = []
    errors: dict[str, str] = {}
    if logging_cfg.tensorboard:
        from detpact.tracking.tensorboard import TensorBoardTracker

        start_step = int(((bundle or {}).get("progress") or {}).get("global_step", 0))
        _start("tensorboard", lambda: TensorBoardTracker(run.tensorboard, start_step), trackers, errors)
    if logging_cfg.mlflow is not None:
        from detpact.tracking.mlflow import MlflowTracker

        _start("mlflow", lambda: MlflowTracker(logging_cfg.mlflow, run, flat_params(cfg), run_tags(cfg, run, meta)),
               trackers, errors)
    for tracker in trackers:
        where = ", ".join(f"{key} {value}" for key, value in tracker.describe().items() if value is not None)
        log.info("tracking to %s: %s", tracker.name, where)
    return TrackerSet(trackers, errors)


def finish_tracking(trackers: TrackerSet, run: RunDir, failure: BaseException | None = None) -> None:
    """Upload the run's files and close every tracker (with the run's outcome), then record
    how each fared in train_report.json under `tracking`. Never raises for a tracker."""
    if not trackers:
        return
    status = FINISHED if failure is None else KILLED if isinstance(failure, TrainingStopped) else FAILED
    trackers.finish(run, status)
    report = read_json(run.train_report_json)
    if not isinstance(report, dict):
        return  # a run that failed before its first report
    try:
        report["tracking"] = trackers.report()
        atomic_write_json(run.train_report_json, report)
        if "reports/train_report.json" in (read_manifest(run) or {}):  # keep the manifest true to the file
            write_manifest(run)
    except OSError as exc:  # a full disk must not hide the run's own outcome
        log.warning("could not record the tracking outcome in %s: %s", run.train_report_json, exc)
    if trackers.errors:
        log.warning("tracking errors (recorded in %s): %s", run.train_report_json,
                    "; ".join(f"{name}: {message}" for name, message in trackers.errors.items()))


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as {dotted key: value text} (lists and mappings as JSON)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", resolved_dict(cfg))
    if cfg.logging.mlflow is not None:
        flat["logging.mlflow.tracking_uri"] = json.dumps(redact_uri(cfg.logging.mlflow.tracking_uri))
    return flat


def run_tags(cfg: Config, run: RunDir, meta: Mapping[str, Any]) -> dict[str, str]:
    """What identifies the run: config hash, dataset fingerprint, git SHA (MLflow's own
    mlflow.source.git.commit too), run id and task."""
    tags = {
        "detpact.run_id": run.root.name,
        "detpact.task": cfg.task,
        "detpact.config_hash": meta.get("config_hash"),
        "detpact.dataset_fingerprint": meta.get("dataset_fingerprint"),
        "detpact.git_sha": meta.get("git_sha"),
        "detpact.git_dirty": meta.get("git_dirty"),
        "mlflow.source.git.commit": meta.get("git_sha"),
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def _start(name: str, build: Any, trackers: list[Tracker], errors: dict[str, str]) -> None:
    try:
        trackers.append(build())
    except Exception as exc:  # a tracker that is down never stops training
        errors[name] = f"start: {one_line(exc)}"
        log.warning("%s tracking failed (%s); training goes on without it", name, errors[name])
