"""RELIABILITY row 8: an exception partway through a checkpoint save in a real training
run ends the run with that exception, and the checkpoint before it stays whole."""

from __future__ import annotations

import pytest
import torch

import detpact.run.checkpoint as checkpoint_module
from conftest import TINY_CONFIG
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
