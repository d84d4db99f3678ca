"""The tracking pieces on their own: scalar names, the guard that drops a failing tracker,
the flattened params, the check of the extra, and TensorBoard's event files read back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_CONFIG
from detpact.config import validate_config
from detpact.errors import DetpactError
from detpact.run.contract import RunDir
from detpact.tracking import TrackerSet, check_tracking
from detpact.tracking.base import FINISHED, redact_uri, scalars
from detpact.tracking.session import flat_params
from detpact.tracking.tensorboard import TensorBoardTracker


def test_scalars_keep_finite_numbers_and_flatten_nested_metrics():
    record = {"map50_95": 0.5, "map_medium": None, "num_gt": 15, "skipped": False, "stage": "warm",
              "per_class": {"circle": 0.25, "star": float("nan")}, "iou_sweep": [{"iou": 0.5}],
              "operating_point": {"recall": 1.0, "per_class": {"circle": {"recall": 1.0}}}}
    assert dict(scalars(record, "val")) == {"val/map50_95": 0.5, "val/num_gt": 15.0,
                                            "val/per_class/circle": 0.25, "val/operating_point/recall": 1.0}


class Recording:
    def __init__(self, name: str, fail_on: str | None = None):
        self.name, self.fail_on, self.calls = name, fail_on, []

    def _call(self, method: str, *args) -> None:
        self.calls.append((method, *args))
        if method == self.fail_on:
            raise ConnectionError(f"{self.name} is down\nsecond line")

    def log_step(self, step, record):
        self._call("log_step", step)

    def log_validation(self, step, metrics):
        self._call("log_validation", step)

    def finish(self, run, status):
        self._call("finish", status)

    def describe(self):
        return {"where": self.name}


def test_a_failing_tracker_is_dropped_reported_and_the_others_go_on(tmp_path: Path, caplog):
    broken, healthy = Recording("broken", fail_on="log_step"), Recording("healthy")
    trackers = TrackerSet([broken, healthy], errors={"never": "start: refused"})
    for step in (1, 2, 3):
        trackers.log_step(step, {"loss": 1.0})
    trackers.log_validation(3, {"map50_95": 0.1})
    trackers.finish(RunDir(tmp_path), FINISHED)
    assert broken.calls == [("log_step", 1)]  # one failure, then no more calls (no timeout per step)
    assert healthy.calls == [("log_step", 1), ("log_step", 2), ("log_step", 3), ("log_validation", 3),
                             ("finish", FINISHED)]
    report = trackers.report()
    assert report["healthy"] == {"ok": True, "error": None, "where": "healthy"}
    assert report["broken"]["ok"] is False and report["broken"]["error"] == "log_step: ConnectionError: broken is down"
    assert report["broken"]["where"] == "broken"  # where it logged until it failed
    assert report["never"] == {"ok": False, "error": "start: refused"}
    assert "broken tracking failed" in caplog.text


def test_a_tracker_whose_upload_fails_at_the_end_keeps_where_it_logged(tmp_path: Path):
    trackers = TrackerSet([Recording("uploader", fail_on="finish")])
    trackers.finish(RunDir(tmp_path), FINISHED)
    assert trackers.report()["uploader"] == {"ok": False, "error": "finish: ConnectionError: uploader is down",
                                             "where": "uploader"}


def test_redact_uri_hides_credentials_only():
    assert redact_uri("https://user:secret@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri(None) is None


def test_params_are_the_resolved_config_flattened_to_dotted_keys():
    cfg = validate_config({**TINY_CONFIG, "logging": {"mlflow": {"tracking_uri": "http://u:p@host:1"}}})
    params = flat_params(cfg)
    assert params["train.epochs"] == "2" and params["task"] == "shapes" and params["run.amp"] == "bf16"
    assert params["data.synthetic.num_train"] == "24" and params["logging.mlflow.experiment"] == "detpact"
    assert params["logging.mlflow.tracking_uri"] == '"http://***@host:1"'
    assert all(isinstance(v, str) for v in params.values()) and not any(k.endswith(".") for k in params)


@pytest.mark.parametrize(("key", "module"), [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_named_with_its_install_command(monkeypatch, key, module):
    on = {"tensorboard": True} if key == "tensorboard" else {"mlflow": {"tracking_uri": "http://127.0.0.1:1"}}
    cfg = validate_config({**TINY_CONFIG, "logging": on})
    check_tracking(cfg.logging)  # installed here: passes
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    with pytest.raises(DetpactError, match=rf"logging\.{key} is on, but {key} is not installed.*"
                                           r"pip install 'detpact\[tracking\]'"):
        check_tracking(cfg.logging)
    check_tracking(validate_config(TINY_CONFIG).logging)  # off: nothing is imported, nothing is needed


def test_tensorboard_event_files_read_back_per_step(tmp_path: Path):
    tracker = TensorBoardTracker(tmp_path / "tb")
    for step in (1, 2, 3):
        tracker.log_step(step, {"step": step, "epoch": 0, "lr": 0.1 * step, "loss": 10.0 - step, "skipped": False})
    tracker.log_validation(3, {"epoch": 1, "map50_95": 0.25, "per_class": {"circle": 0.5}})
    tracker.finish(RunDir(tmp_path), FINISHED)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert set(events.Tags()["scalars"]) == {"train/epoch", "train/lr", "train/loss", "val/epoch",
                                             "val/map50_95", "val/per_class/circle"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/per_class/circle")] == [(3, 0.5)]


def test_a_resumed_session_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path: Path):
    first = TensorBoardTracker(tmp_path / "tb")
    for step in range(1, 6):  # crashed after step 5, its last checkpoint at step 3
        first.log_step(step, {"loss": float(step)})
    first.finish(RunDir(tmp_path), FINISHED)
    resumed = TensorBoardTracker(tmp_path / "tb", start_step=3)
    for step in (4, 5, 6):
        resumed.log_step(step, {"loss": 10.0 * step})
    resumed.finish(RunDir(tmp_path), FINISHED)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                                         (5, 50.0), (6, 60.0)]
