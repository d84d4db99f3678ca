"""Exact resume with every continual-learning penalty on (issue 15): task A trains and
leaves its continual state (Fisher, SI importance, DER++ buffer); task B starts from its
best.pt with A as the distillation teacher, EWC, SI and DER++ on, is killed (SIGKILL)
inside its last step (after the first of its two micro-batches) and resumed from the
checkpoint of the step before, and ends with the bits of an uninterrupted task B: weights,
optimizer, metric lines (each penalty's own loss column), the penalties' state in last.pt
and the continual.pt it hands on. Task B also trains a model.mim_decoder (issue 16), whose
masks are drawn from (seed, step, micro-batch): the resumed run masks as the uninterrupted
one, so its loss_mim lines match too."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import assert_same_run, make_env, run_cli, train_tiny_run, write_tiny_config

pytestmark = pytest.mark.slow

PENALTIES = ("loss_distill", "loss_derpp_logits", "loss_derpp_labels", "loss_ewc", "loss_si")


@pytest.fixture(scope="module")
def task_a(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("task_a")
    env, run, _ = train_tiny_run(root, cache_dir, "--set", "train.epochs=1", "--set", "train.continual.save_state=true",
                                 "--set", "train.continual.derpp.buffer_size=12")
    return env, run


def _same(ours, theirs, where: str = "") -> list[str]:
    """Where two nested bundles differ (tensors compared bit for bit)."""
    if isinstance(ours, torch.Tensor):
        same = isinstance(theirs, torch.Tensor) and ours.dtype == theirs.dtype and torch.equal(ours, theirs)
        return [] if same else [where]
    if isinstance(ours, dict):
        if not isinstance(theirs, dict) or ours.keys() != theirs.keys():
            return [where]
        return [d for key in ours for d in _same(ours[key], theirs[key], f"{where}.{key}")]
    if isinstance(ours, (list, tuple)):
        if len(ours) != len(theirs):
            return [where]
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in _same(a, b, f"{where}.{i}")]
    return [] if ours == theirs else [where]


def test_killed_continual_run_resumes_to_the_same_bits(tmp_path, cache_dir, task_a):
    env, run_a = make_env(tmp_path / "runs", cache_dir), task_a[1]
    state_a = torch.load(run_a / "checkpoints" / "continual.pt", weights_only=True)
    assert state_a["ewc"]["fisher"] and state_a["si"]["importance"] and len(state_a["derpp"]["images"]) == 12
    assert "checkpoints/continual.pt" in json.loads((run_a / "manifest.json").read_text())["files"]
    best = run_a / "checkpoints" / "best.pt"
    config = write_tiny_config(tmp_path / "tiny.yaml")
    # Batches of 4 two to a step: 3 steps, one epoch; a checkpoint every 2 steps.
    sets = ["--set", "train.batch_size=4", "--set", "train.accumulate=2", "--set", "train.max_steps=3",
            "--set", "train.checkpoint.every_steps=2",
            "--set", f"model.init_from={best}", "--set", "model.mim_decoder=true",
            "--set", f"train.continual={{previous: {run_a / 'checkpoints' / 'continual.pt'}, save_state: true, "
                     f"self_distill: {{teacher: {best}, weight: 1.0, kl: sym}}, "
                     "derpp: {alpha: 0.5, beta: 0.5, buffer_size: 12, replay_batch: 4}, "
                     "ewc: {weight: 100.0, gamma: 0.9, fisher_batches: 2}, si: {c: 1.0}}"]

    def train(run_id: str, *extra: str, fault: str | None = None):
        return run_cli(["train", str(config), "--run-id", run_id, *sets, *extra],
                       {**env, "DETPACT_FAULT": fault} if fault else env, tmp_path)

    straight = train("straight")
    assert straight.returncode == 0, straight.stderr
    killed = train("killed", fault="kill@step=3:micro=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = train("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2" in resumed.stderr
    run, reference = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    assert_same_run(run, reference)
    lines = [json.loads(line) for line in (run / "reports" / "train_metrics.jsonl").read_text().splitlines()]
    # Task B starts from task A's best.pt, the anchor: EWC and SI are 0 until the first step moves it.
    assert len(lines) == 3 and all(key in line for line in lines for key in (*PENALTIES, "loss_mim"))
    assert lines[0]["loss_ewc"] == lines[0]["loss_si"] == 0.0
    assert all(line[key] > 0 for line in lines[1:] for key in PENALTIES)
    ours, theirs = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["continual"] for r in (run, reference))
    assert set(ours) == {"distill", "derpp", "ewc", "si"}
    assert _same(ours, theirs) == []
    handed_on = [torch.load(r / "checkpoints" / "continual.pt", weights_only=True) for r in (run, reference)]
    assert _same(*handed_on) == []
    assert handed_on[0]["derpp"]["seen"] == 24 + 24  # task A's epoch of 24 images, then task B's 3 steps of 8
