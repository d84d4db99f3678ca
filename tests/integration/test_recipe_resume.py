"""Exact resume for the solver knobs (issue 11): SGD with a multistep schedule inside
the second of two training stages with epoch snapshots kept, and the onecycle schedule.
Each run killed mid-way (SIGKILL) and resumed ends with the bits of an uninterrupted one."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import assert_same_run, make_env, run_cli, write_tiny_config

pytestmark = pytest.mark.slow

# The tiny config: 3 steps per epoch; 3 epochs = 9 steps, a checkpoint every 2.
COMMON = ["--set", "train.epochs=3", "--set", "train.checkpoint.every_steps=2"]
RECIPES = {
    # Stage 0: steps 1-2 (backbone frozen, lr x 0.5); stage 1: steps 3-5 (the head's
    # classification branches frozen); then everything. Killed after step 5, resumed
    # from the checkpoint of step 4: inside stage 1.
    "sgd_multistep_stages": (
        ["--set", "train.optimizer={name: sgd, lr: 0.01, momentum: 0.9, nesterov: true}",
         "--set", "train.scheduler={name: multistep, milestones: [4, 7], gamma: 0.5, warmup_steps: 1}",
         "--set", "train.stages=[{steps: 2, freeze: [backbone], lr_mult: 0.5}, {steps: 3, freeze: [head.cls_branches]}]",
         "--set", "train.checkpoint.keep_epochs=2"],
        "kill@step=5", 4),
    # Batches of 5 with drop_last off: 4 full batches and one of 4 per epoch (15 steps), and
    # loss balancing: learned uncertainty weights, the box loss ramped from x 0.5 over the
    # first epoch, every component clipped at 50. The resume (from step 6) falls inside the
    # 8-step warm-up; the multistep one above, right at its milestone 4.
    "onecycle_partial_batches_balanced": (
        ["--set", "train.scheduler={name: onecycle, warmup_steps: 8}", "--set", "train.batch_size=5",
         "--set", "train.drop_last=false", "--set", "train.task_aligner=uncertainty",
         "--set", "train.loss_box_warmup_epochs=1", "--set", "train.loss_box_scale_start=0.5",
         "--set", "train.loss_component_clip=50"],
        "kill@step=7", 6),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_killed_recipe_resumes_to_the_same_bits(tmp_path, cache_dir, recipe):
    sets, fault, resumed_at = RECIPES[recipe]
    env = make_env(tmp_path / "runs", cache_dir)
    config = write_tiny_config(tmp_path / "tiny.yaml")

    def train(run_id: str, *extra: str, fault: str | None = None):
        return run_cli(["train", str(config), "--run-id", run_id, *COMMON, *sets, *extra],
                       {**env, "DETPACT_FAULT": fault} if fault else env, tmp_path)

    straight = train("straight")
    assert straight.returncode == 0, straight.stderr
    killed = train("killed", fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = train("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {resumed_at}" in resumed.stderr
    run = tmp_path / "runs" / "killed"
    assert_same_run(run, tmp_path / "runs" / "straight")
    if recipe == "onecycle_partial_batches_balanced":
        report = json.loads((run / "reports" / "train_report.json").read_text())
        assert report["counters"]["steps"] == 15 and report["counters"]["samples_seen"] == 72  # every image
        assert {g["name"]: g["weight_decay"] for g in report["optimizer"]["groups"]}["task_aligner"] == 0.0
        lines = [json.loads(line) for line in (run / "reports" / "train_metrics.jsonl").read_text().splitlines()]
        assert [line["box_scale"] for line in lines[:6]] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
        weights = [line["task_weight/loss_cls"] for line in lines]
        assert weights[0] == 1.0 and len(set(weights)) > 10  # learned: exp(-s) moves from 1 every step
        assert all(k in lines[0] for k in ("clipped/loss_cls", "task_weight/loss_box", "task_weight/loss_dfl"))
        rates = [line["lr"] for line in lines]  # equal to the uninterrupted run's (assert_same_run)
        # Resumed at 6: inside the warm-up, which peaks at step 9 (0-based 8).
        assert rates[:9] == sorted(rates[:9]) and rates[6] < rates[8] == max(rates)
    if recipe == "sgd_multistep_stages":
        lines = [json.loads(line) for line in (run / "reports" / "train_metrics.jsonl").read_text().splitlines()]
        assert [line["stage"] for line in lines] == [0, 0, 1, 1, 1, None, None, None, None]
        # A one-step warm-up (half the rate), x 0.5 in stage 0, then x 0.5 from the milestones 4 and 7.
        assert [line["lr"] for line in lines] == pytest.approx([0.0025, 0.005, 0.01, 0.01, 0.005, 0.005, 0.005,
                                                                0.0025, 0.0025])
        assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
        verified = run_cli(["runs", "verify", str(run)], env, tmp_path)
        assert verified.returncode == 0, verified.stdout
