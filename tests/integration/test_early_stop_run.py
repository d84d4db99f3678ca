"""Early stopping in a real run: it ends at the validation the rule names, says why in
train_report.json and status.json, a run killed before that stops at the same step with
the same bits, and resuming a stopped run trains nothing more."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import assert_same_run, make_env, run_cli, write_tiny_config

# 3 epochs of 3 steps; no validation can beat the previous best by 1.0, so the second
# validation (end of epoch 2, step 6) is the first stale one and patience 1 stops there.
SETS = ["--set", "train.epochs=3", "--set", "train.early_stop={patience: 1, min_delta: 1.0}"]

pytestmark = pytest.mark.slow


def test_early_stop_ends_the_run_resumes_exactly_and_stays_stopped(tmp_path, cache_dir):
    env = make_env(tmp_path / "runs", cache_dir)
    config = write_tiny_config(tmp_path / "tiny.yaml")

    def train(run_id: str, *extra: str, fault: str | None = None):
        return run_cli(["train", str(config), "--run-id", run_id, *SETS, *extra],
                       {**env, "DETPACT_FAULT": fault} if fault else env, tmp_path)

    straight = train("straight")
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "runs" / "straight"
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["end_reason"] == "early_stop" and report["counters"]["steps"] == 6
    assert [json.loads(line)["step"] for line in (run / "reports" / "val_metrics.jsonl").read_text().splitlines()] \
        == [3, 6]
    status = json.loads((run / "status.json").read_text())
    assert status["phase"] == "done" and status["end_reason"] == "early_stop"

    again = train("straight", "--resume")  # a stopped run stays stopped
    assert again.returncode == 0 and "nothing left to train" in again.stderr, again.stderr
    assert json.loads((run / "reports" / "train_report.json").read_text())["counters"]["steps"] == 6

    # Validation every 2 steps as well (mid-epoch): step 2, then the epoch end at step 3, stale.
    by_steps = train("by_steps", "--set", "eval.every_steps=2")
    assert by_steps.returncode == 0, by_steps.stderr
    val = tmp_path / "runs" / "by_steps" / "reports" / "val_metrics.jsonl"
    assert [json.loads(line)["step"] for line in val.read_text().splitlines()] == [2, 3]

    killed = train("killed", fault="kill@step=5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = train("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "runs" / "killed", run)
    assert json.loads((tmp_path / "runs" / "killed" / "reports" / "train_report.json").read_text())["end_reason"] \
        == "early_stop"
