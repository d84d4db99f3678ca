"""train.time_budget: the run's length is planned from a measured warm-up, recorded, kept
on resume, and the run equals one of that fixed length bit for bit."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import assert_same_run, make_env, run_cli, write_tiny_config

pytestmark = pytest.mark.slow


def test_time_budget_plans_the_length_and_a_resume_keeps_it(tmp_path, cache_dir):
    env = make_env(tmp_path / "runs", cache_dir)
    config = write_tiny_config(tmp_path / "tiny.yaml")
    sets = ["--set", "train.checkpoint.every_steps=2"]

    def train(run_id: str, *extra: str, fault: str | None = None):
        return run_cli(["train", str(config), "--run-id", run_id, *sets, *extra],
                       {**env, "DETPACT_FAULT": fault} if fault else env, tmp_path)

    budget = ["--set", "train.time_budget=0.001"]  # 3.6 s
    killed = train("budget", *budget, fault="kill@step=4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "train.time_budget: timing 5 steps" in killed.stderr
    run = tmp_path / "runs" / "budget"
    planned = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["time_budget"]
    steps = planned["total_steps"]
    assert steps > 4 and planned["hours"] == 0.001 and planned["step_seconds"] > 0  # the tiny epochs say 6

    resumed = train("budget", *budget, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "timing" not in resumed.stderr and f"{steps} optimizer steps" in resumed.stderr  # the plan is kept
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["plan"]["time_budget"] == planned and report["counters"]["steps"] == steps
    assert report["end_reason"] == "time_budget"
    # The measurement left no trace: the run is the run of that fixed length.
    fixed = train("fixed", "--set", "train.epochs=1000", "--set", f"train.max_steps={steps}")
    assert fixed.returncode == 0, fixed.stderr
    assert_same_run(run, tmp_path / "runs" / "fixed")
