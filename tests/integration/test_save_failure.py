"""RELIABILITY rows 8 and 9: an exception partway through a checkpoint save in a real
training run ends the run with that exception, and a full disk ends it as a resumable
abort (exit 3) naming the step; either way the checkpoint before it stays whole."""

from __future__ import annotations

import json

import pytest
import torch

import detpact.run.checkpoint as checkpoint_module
from conftest import TINY_CONFIG, make_env, run_cli, write_tiny_config
from detpact import api
from detpact.config import validate_config
from detpact.run.atomic import stale_temp_files
from detpact.run.checkpoint import load_checkpoint


def test_an_exception_inside_a_save_ends_the_run_and_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    real_save, saves = torch.save, []

    def save_then_fail(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint: a few bytes written, then the failure
            handle.write(b"PK\x03\x04 partial")
            raise RuntimeError("boom inside torch.save")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_fail)
    cfg = validate_config({**TINY_CONFIG, "train": {**TINY_CONFIG["train"], "checkpoint": {"every_steps": 2}}})
    env = {"DETPACT_OUTPUT_DIR": str(tmp_path / "runs"), "DETPACT_CACHE_DIR": str(cache_dir)}
    with pytest.raises(RuntimeError, match="boom inside torch.save"):
        api.train(cfg, run_id="boom", environ=env)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    checkpoints = tmp_path / "runs" / "boom" / "checkpoints"
    assert load_checkpoint(checkpoints / "last.pt")["progress"]["global_step"] == 2  # the first save, whole
    assert not stale_temp_files(checkpoints)


def test_a_full_disk_aborts_the_run_naming_the_step_and_a_resume_finishes_it(tmp_path, cache_dir):
    env, config = make_env(tmp_path / "runs", cache_dir), write_tiny_config(tmp_path / "tiny.yaml")
    sets = ["--set", "train.max_steps=6", "--set", "train.checkpoint.every_steps=2"]
    full = run_cli(["train", str(config), "--run-id", "full", *sets], {**env, "DETPACT_FAULT": "full@save=4"}, tmp_path)
    assert full.returncode == 3, full.stderr  # TrainingAborted: resumable, not bad input
    assert "The disk is full while writing the checkpoint of step 4" in full.stderr
    assert "Traceback" not in full.stderr
    run = tmp_path / "runs" / "full"
    checkpoints = run / "checkpoints"
    # The last good one, whole: step 3's (every 2 steps, and at the end of each 3-step epoch).
    assert load_checkpoint(checkpoints / "last.pt")["progress"]["global_step"] == 3
    assert not stale_temp_files(checkpoints)
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["end_reason"] == "disk_full"
    steps = [json.loads(line)["step"] for line in (run / "reports" / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the metrics of the steps trained are kept
    resumed = run_cli(["train", str(config), "--run-id", "full", *sets, "--resume"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(checkpoints / "last.pt")["progress"]["global_step"] == 6
