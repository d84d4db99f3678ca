"""A tiny run trained with LoRA adapters: killed and resumed to the same bits, its report,
and `detpact lora merge` giving a plain checkpoint that evaluates as the run's best.pt."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run, make_env, run_cli, write_tiny_config
from detpact import api
from detpact.cli import main
from detpact.commands.evaluate import evaluate_as_trained
from detpact.commands.lora import merge_bundle, merge_run
from detpact.data.build import build_datasets
from detpact.errors import DetpactError
from detpact.inference.predictor import load_detector
from detpact.run.contract import RunDir

# 4 steps of 4 images, checkpoints every 2 steps (and adapter dropout, whose draws
# a resume must repeat); float32, so that the validation of the adapted model during
# training and the evaluation of the merged one compare closely.
SETS = ["--set", "train.lora.r=4", "--set", "train.lora.target=all_conv1x1", "--set", "train.lora.dropout=0.1",
        "--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "train.checkpoint.every_steps=2",
        "--set", "run.amp=none"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> tuple[Path, dict[str, str], Path]:
    root = tmp_path_factory.mktemp("lora")
    env = make_env(root / "runs", cache_dir)
    config = write_tiny_config(root / "tiny.yaml")
    straight = run_cli(["train", str(config), "--run-id", "straight", *SETS], env, root)
    assert straight.returncode == 0, straight.stderr
    return root, env, config


def test_a_lora_run_trains_only_its_adapters_and_reports_them(runs):
    root, _, _ = runs
    run = root / "runs" / "straight"
    report = json.loads((run / "reports" / "train_report.json").read_text())
    lora = report["weights"]["lora"]
    assert lora["target"] == "all_conv1x1" and lora["adapted_layers"] == 24
    assert report["weights"]["freeze"]["trainable_params"] == lora["trainable_params"] == lora["adapter_params"]
    bundle = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    adapters = [key for key in bundle["model"] if key.endswith((".lora_a", ".lora_b"))]
    assert len(adapters) == 48 and any(bundle["model"][k].abs().sum() > 0 for k in adapters if k.endswith("lora_b"))


def test_killed_lora_run_resumes_to_the_same_bits(runs):
    root, env, config = runs
    crashed = run_cli(["train", str(config), "--run-id", "killed", *SETS], {**env, "DETPACT_FAULT": "kill@step=3"},
                      root)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = run_cli(["train", str(config), "--run-id", "killed", "--resume", *SETS], env, root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2 " in resumed.stderr
    assert_same_run(root / "runs" / "killed", root / "runs" / "straight")


def test_lora_merge_writes_a_plain_checkpoint_that_evaluates_as_best(runs, capsys):
    root, env, _ = runs
    run = root / "runs" / "straight"
    out = root / "merged.pt"
    assert main(["lora", "merge", str(run), "--out", str(out)]) == 0  # the CLI in-process: no interpreter start
    assert "merged the LoRA adapters of 24 layers" in capsys.readouterr().out
    bundle = torch.load(out, weights_only=True)
    assert bundle["config"]["train"]["lora"]["r"] == 0 and bundle["optimizer"] is None
    assert not [key for key in bundle["model"] if "lora" in key]

    plain = load_detector(out, torch.device("cpu"))  # loads like any checkpoint: no adapter in the model
    assert not any("lora" in name for name, _ in plain.model.named_parameters())
    from_best = load_detector(run / "checkpoints" / "best.pt", torch.device("cpu"))  # merged on loading
    data = build_datasets(plain.config.data, Path(env["DETPACT_CACHE_DIR"]))
    ours = evaluate_as_trained(RunDir(run), plain, data.val, data.class_names, plain.config.eval)
    best = evaluate_as_trained(RunDir(run), from_best, data.val, data.class_names, from_best.config.eval)
    assert ours == best
    recorded = from_best.bundle["best_metric"]["map50_95"]  # validated with the adapters, unmerged
    assert abs(ours["map50_95"] - recorded) < 1e-4, (ours["map50_95"], recorded)
    # `detpact eval merged.pt` / `detpact predict merged.pt`: a checkpoint file outside any run
    checked = api.evaluate_checkpoint(out, environ=env)  # on the dataset of its embedded config
    assert checked["map50_95"] == pytest.approx(ours["map50_95"], abs=1e-6) and checked["num_images"] == len(data.val)
    records = api.predict(out, [str(data.val[0].image_path)], out=root / "merged_predictions.json", environ=env)
    assert len(records) == 1 and records[0]["detections"]
    # `runs verify` re-evaluates best.pt with its adapters unmerged, as validation ran: exactly.
    reevaluated = [c for c in api.verify(run, environ=env) if c.name == "best.pt re-evaluated"]
    assert [c.status for c in reevaluated] == ["pass"], reevaluated

    with pytest.raises(DetpactError, match="ending in .pt"):
        merge_run(run, root / "merged.txt", environ=env)
    with pytest.raises(DetpactError, match="trained without LoRA adapters"):
        merge_bundle(torch.load(out, weights_only=True), str(out))
