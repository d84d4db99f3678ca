"""Starting weights from a file (model.init_from) end to end: a trained run's last.pt gives
a new detector the same evaluation; with another class count the head tensors of another
shape are reported and keep their initial values while training goes on, with parts frozen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_env, run_cli, write_tiny_config
from detpact.config import Config
from detpact.data.build import build_datasets
from detpact.data.dataset import eval_loader
from detpact.engine.evaluate import evaluate
from detpact.inference.predictor import load_detector
from detpact.models.detector import build_model
from detpact.run.checkpoint import inference_state_dict
from detpact.run.weights import apply_initial_weights

pytestmark = pytest.mark.slow

SEVEN_CLASSES = "[circle,square,triangle,star,cross,extra1,extra2]"  # the shapes' five, then two more


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir):
    """One tiny synthetic run, trained once for the module; its data generated into `shapes/`."""
    root = tmp_path_factory.mktemp("init_from")
    env = make_env(root / "runs", cache_dir)
    config = write_tiny_config(root / "tiny.yaml")
    trained = run_cli(["train", str(config), "--run-id", "base", "--set", f"data.path={root / 'shapes'}"], env, root)
    assert trained.returncode == 0, trained.stderr
    return root, env, config


def metrics_of(model: torch.nn.Module, cfg: Config, device: torch.device, cache_dir: Path) -> dict:
    data = build_datasets(cfg.data, cache_dir, progress=False)
    return evaluate(model, eval_loader(data.val, cfg.data, cfg.eval.batch_size), data.val, data.class_names,
                    cfg.model.postprocess, device, cfg.run.amp, cfg.run.channels_last)


def test_init_from_last_pt_evaluates_identically(base, cache_dir):
    root, _, _ = base
    last = root / "runs" / "base" / "checkpoints" / "last.pt"
    loaded = load_detector(last)
    cfg = loaded.config.model_copy(update={"model": loaded.config.model.model_copy(update={"init_from": str(last)})})
    model = build_model(cfg.model, len(loaded.class_names))
    reports = apply_initial_weights(model, cfg.model)
    counts = reports["init_from"]["counts"]
    assert counts == {"matched": len(model.state_dict()), "missing": 0, "unexpected": 0, "shape_mismatched": 0}
    state = model.state_dict()
    assert [k for k, v in inference_state_dict(loaded.bundle).items() if not torch.equal(state[k], v)] == []
    model = model.to(loaded.device, memory_format=torch.channels_last).eval()

    theirs = metrics_of(loaded.model, loaded.config, loaded.device, cache_dir)
    ours = metrics_of(model, cfg, loaded.device, cache_dir)
    assert ours == theirs and ours["map50_95"] is not None


def test_another_class_count_reports_the_head_and_trains_with_frozen_parts(base):
    root, env, config = base
    shutil.copy(root / "runs" / "base" / "checkpoints" / "last.pt", root / "init.pt")
    sets = ["--set", "data.format=yolo", "--set", f"data.path={root / 'shapes'}", "--set",
            f"data.classes={SEVEN_CLASSES}", "--set", "model.init_from=init.pt",  # relative to the current directory
            "--set", "model.freeze=[backbone]", "--set", "model.freeze_bn=true", "--set", "train.max_steps=2"]
    trained = run_cli(["train", str(config), "--run-id", "seven", *sets], env, root)
    assert trained.returncode == 0, trained.stderr
    assert "head: 6 tensors with another shape (head.cls_branches." in trained.stderr + trained.stdout

    run = root / "runs" / "seven"
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["counters"]["steps"] == 2
    weights = report["weights"]
    init = weights["init_from"]
    assert init["file"] == "init.pt" and init["into"] == "detector" and weights["backbone_weights"] is None
    mismatched = {m["key"]: m for m in init["shape_mismatched"]}
    assert len(mismatched) == 6 and all(key.startswith("head.cls_branches.") for key in mismatched)
    assert {m["file_shape"][0] for m in mismatched.values()} == {5}
    assert {m["model_shape"][0] for m in mismatched.values()} == {7}
    freeze = weights["freeze"]
    assert freeze["frozen_parts"] == ["backbone"] and freeze["freeze_bn"] and freeze["frozen_bn_layers"] > 0
    assert freeze["frozen_params"] > 0 and freeze["trainable_params"] > 0

    # The frozen backbone, statistics included, is still exactly the weights it started from.
    bundle = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    start = inference_state_dict(torch.load(root / "init.pt", weights_only=True))
    backbone = {k: v for k, v in bundle["model"].items() if k.startswith("backbone.")}
    assert backbone and [k for k, v in backbone.items() if not torch.equal(v, start[k])] == []
    assert bundle["weights"] == weights  # the checkpoint carries the same record

    # A resume takes its weights from the checkpoint and carries the record on, without the file.
    (root / "init.pt").unlink()
    resumed = run_cli(["train", str(config), "--run-id", "seven", "--resume", *sets], env, root)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "reports" / "train_report.json").read_text())["weights"] == weights
