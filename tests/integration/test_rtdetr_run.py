"""The run contract holds for the rtdetr head: a run killed inside an accumulation group
resumes to the same bits as one left alone (denoising noise, Hungarian matching, the
deformable sampling, SGD's momentum in per-part groups and a multistep schedule included), and the finished run exports (dynamo, parity-gated) and
passes `runs verify`. Real subprocesses, a real SIGKILL, real onnxruntime."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import assert_same_run, make_env, run_cli, write_tiny_config

# The tiny config with a small rtdetr head: 64 px images have 84 positions, 20 queries.
RTDETR = ["--set", "model.head.name=rtdetr", "--set", "model.projector.d_model=32",
          "--set", "model.head.rtdetr={num_queries: 20, num_decoder_layers: 2, num_heads: 2, dim_feedforward: 64, "
                   "encoder_ffn: 64, num_denoising: 12}",
          "--set", "train.batch_size=4", "--set", "train.nominal_batch=8",
          # SGD with a slower backbone: the resume must restore momentum and every group.
          "--set", "train.optimizer={name: sgd, lr: 0.01, momentum: 0.9, nesterov: true, backbone_lr_mult: 0.1}",
          "--set", "train.scheduler={name: multistep, milestones: [3, 5], gamma: 0.5, warmup_steps: 1}"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("rtdetr")
    return root, make_env(root / "runs", cache_dir), write_tiny_config(root / "tiny.yaml")


def train(setup, run_id: str, *extra: str, fault: str | None = None):
    root, env, config = setup
    env = {**env, "DETPACT_FAULT": fault} if fault else env
    return run_cli(["train", str(config), "--run-id", run_id, *RTDETR, *extra], env, root)


def test_rtdetr_run_resumes_to_the_same_bits_exports_and_verifies(setup):
    root, env, _ = setup
    straight = train(setup, "straight", "--set", "export.onnx=true")
    assert straight.returncode == 0, straight.stderr
    reference = root / "runs" / "straight"
    groups = json.loads((reference / "reports" / "train_report.json").read_text())["optimizer"]["groups"]
    assert [(g["name"], g["lr_mult"]) for g in groups] == [("backbone/decay", 0.1), ("backbone/no_decay", 0.1),
                                                            ("head/decay", 1.0), ("head/no_decay", 1.0)]
    parity = json.loads((reference / "reports" / "onnx_parity.json").read_text())
    assert parity["verdict"] == "pass"
    meta = json.loads((reference / "exports" / "model.onnx.meta.json").read_text())
    assert meta["postprocessing"]["nms"] == "none" and meta["outputs"]["scores"]["shape"][1] == "queries"
    verified = run_cli(["runs", "verify", str(reference)], env, root)
    assert verified.returncode == 0 and "verify: PASS" in verified.stdout, verified.stdout + verified.stderr

    # predict decodes NMS-free: with no score threshold every (query, class) pair is a
    # detection, 20 x 5 = max_det 100, none suppressed however much they overlap.
    image = sorted(Path(env["DETPACT_CACHE_DIR"]).rglob("images/val/*.jpg"))[0]
    predicted = run_cli(["predict", str(reference), str(image), "--out", str(root / "preds.json"), "--conf", "0.0"],
                        env, root)
    assert predicted.returncode == 0, predicted.stderr
    detections = json.loads((root / "preds.json").read_text())["predictions"][0]["detections"]
    assert len(detections) == 100 and detections == sorted(detections, key=lambda d: -d["score"])

    # A run whose end-of-training export failed is done once a re-export passes.
    (reference / "status.json").write_text(json.dumps({"phase": "export_failed", "error": "parity check failed"}))
    exported = run_cli(["export", str(reference)], env, root)
    assert exported.returncode == 0 and "(parity pass)" in exported.stdout, exported.stderr
    assert json.loads((reference / "status.json").read_text())["phase"] == "done"

    crashed = train(setup, "killed", fault="kill@step=4:micro=1")  # step 4: the first of epoch 2 (3 per epoch)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = train(setup, "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 3 " in resumed.stderr
    assert_same_run(root / "runs" / "killed", reference)
