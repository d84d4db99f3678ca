"""eval, export and predict on one trained tiny run, through the real CLI: an ONNX file
evaluates like its checkpoint, the in-graph postprocessing like the raw export, and both
predict backends find the same boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, train_tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny run trained 2 epochs and exported (by the legacy tracer: quicker, and it writes opset 17)."""
    root = tmp_path_factory.mktemp("eval_export")
    env, run, val_images = train_tiny_run(root, cache_dir, "--set", "train.epochs=2", "--set", "export.onnx=true",
                                          "--set", "export.exporter=torchscript")
    return root, env, run, val_images


def eval_json(args: list[str], env: dict, cwd: Path) -> dict:
    result = run_cli(["eval", *args, "--json"], env, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_onnx_file_evaluates_like_the_checkpoint(trained):
    root, env, run, _ = trained
    parity = json.loads((run / "reports" / "onnx_parity.json").read_text())
    assert parity["verdict"] == "pass" and parity["map"]["pass"] and parity["map"]["images"] == 6
    onnx_metrics = eval_json([str(run / "exports" / "model.onnx")], env, root)
    assert onnx_metrics["map50_95"] == parity["map"]["onnx"]
    assert abs(onnx_metrics["map50_95"] - parity["map"]["torch"]) <= 0.001  # the checkpoint in float32
    report = json.loads((run / "reports" / "eval_onnx.json").read_text())
    assert report["source"]["onnx"].endswith("model.onnx") and report["num_images"] == 6
    assert "reports/eval_onnx.json" in json.loads((run / "manifest.json").read_text())["files"]
    op = onnx_metrics["operating_point"]
    assert {"precision", "recall", "f1", "mean_iou", "per_class"} <= set(op) and len(op["iou_sweep"]) == 10

    # --max-images and the operating point's thresholds
    first = eval_json([str(run), "--max-images", "2", "--score-threshold", "0.01", "--iou-threshold", "0.3"],
                      env, root)
    assert first["num_images"] == 2
    assert (first["operating_point"]["score_threshold"], first["operating_point"]["iou_threshold"]) == (0.01, 0.3)
    bad = run_cli(["eval", str(run), "--score-threshold", "1.5"], env, root)
    assert bad.returncode == 2 and "--score-threshold" in bad.stderr and "Traceback" not in bad.stderr


def test_postprocessing_in_the_graph_passes_parity_and_evaluates_alike(trained, tmp_path):
    root, env, run, _ = trained
    raw_map = eval_json([str(run / "exports" / "model.onnx")], env, root)["map50_95"]
    exported = run_cli(["export", str(run), "--nms", "--opset", "17"], env, root)
    assert exported.returncode == 0, exported.stderr
    parity = json.loads((run / "reports" / "onnx_parity.json").read_text())
    assert parity["verdict"] == "pass" and parity["opset"] == 17 and parity["in_graph_postprocessing"]
    assert all(c["in_graph"]["pass"] for c in parity["checks"])
    meta = json.loads((run / "exports" / "model.onnx.meta.json").read_text())
    assert set(meta["outputs"]) == {"boxes", "scores", "labels", "num_dets"} and meta["postprocessing"]["in_graph"]
    assert meta["opset"] == 17 and meta["detpact_version"] and meta["config_hash"]
    # The same raw outputs through the same postprocessing: the same detections, the same mAP.
    assert eval_json([str(run / "exports" / "model.onnx")], env, root)["map50_95"] == raw_map

    half = run_cli(["export", str(run), "--half"], env, root)
    assert half.returncode == 2 and "CUDA" in half.stderr and "Traceback" not in half.stderr


def detections(path: Path) -> list[list[dict]]:
    return [image["detections"] for image in json.loads(path.read_text())["predictions"]]


def iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_both_backends_find_the_same_boxes_and_tta_runs(trained, tmp_path):
    root, env, run, val_images = trained
    outs = {}
    for backend in ("torch", "onnxruntime"):
        outs[backend] = tmp_path / f"{backend}.json"
        result = run_cli(["predict", str(run), str(val_images / "*.jpg"), "--backend", backend, "--conf", "0.01",
                          "--batch", "4", "--out", str(outs[backend])], env, root)
        assert result.returncode == 0, result.stderr
        assert run_cli(["predictions", "validate", str(outs[backend])], env, root).returncode == 0
    torch_dets, ort_dets = detections(outs["torch"]), detections(outs["onnxruntime"])
    assert len(torch_dets) == 6 and sum(map(len, torch_dets)) > 0
    # bf16 (torch, as trained) vs float32 (ONNX): every confident box is on both sides.
    for ours, theirs in ((torch_dets, ort_dets), (ort_dets, torch_dets)):
        for image_a, image_b in zip(ours, theirs):
            for det in (d for d in image_a if d["score"] > 0.02):
                best = max((iou(det["box"], d["box"]) for d in image_b if d["class_id"] == det["class_id"]), default=0)
                assert best > 0.9, det

    tta_out = tmp_path / "tta.json"
    tta = run_cli(["predict", str(run), str(val_images), "--tta", "--conf", "0.01", "--out", str(tta_out)], env, root)
    assert tta.returncode == 0, tta.stderr
    meta = json.loads(tta_out.read_text())["meta"]
    assert meta["tta"]["merge"] == "wbf" and meta["tta"]["scales"] == [1.0, 0.83, 1.17]
    assert all(d["score"] > 0.01 for image in detections(tta_out) for d in image)
    # A 64 px model: 0.5 makes a 32 px view, which the exported graph's fixed input cannot take.
    refused = run_cli(["predict", str(run), str(val_images), "--backend", "onnxruntime", "--tta", "--tta-scales",
                       "1.0,0.5", "--out", str(tmp_path / "x.json")], env, root)
    assert refused.returncode == 2 and "--tta-scales 1.0" in refused.stderr
    flip_only = run_cli(["predict", str(run), str(val_images), "--backend", "onnxruntime", "--tta", "--tta-scales",
                         "1.0", "--tta-merge", "nms", "--conf", "0.01", "--out", str(tmp_path / "x.json")], env, root)
    assert flip_only.returncode == 0, flip_only.stderr


def test_a_predictions_file_scores_against_the_run_split(trained, tmp_path):
    root, env, run, val_images = trained
    out = tmp_path / "preds.json"
    assert run_cli(["predict", str(run), str(val_images), "--conf", "0.001", "--max-det", "100", "--out", str(out)],
                   env, root).returncode == 0
    from_file = eval_json(["--predictions", str(out), str(run)], env, root)
    # The file holds what eval computes itself (at predict's rounding: boxes to 0.01 px, scores to 1e-5).
    from_run = eval_json([str(run)], env, root)
    assert from_file["num_images"] == 6 and abs(from_file["map50_95"] - from_run["map50_95"]) < 0.01
    assert np.isclose(from_file["map50"], from_run["map50"], atol=0.01)
    missing = run_cli(["eval", "--predictions", str(out)], env, root)
    assert missing.returncode == 2 and "--gt COCO_JSON, a run folder" in missing.stderr


def test_bad_inputs_are_named_with_the_fix(trained, tmp_path):
    root, env, run, _ = trained
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes((run / "exports" / "model.onnx").read_bytes())
    cases = [
        (["eval", str(lonely)], "model.onnx.meta.json beside it"),
        (["eval", str(run), "--max-images", "0"], "--max-images must be at least 1"),
        (["predict", str(run), str(tmp_path / "nothing" / "*.jpg"), "--out", str(tmp_path / "p.json")],
         "No images match"),
    ]
    for args, message in cases:
        result = run_cli(args, env, root)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, args


def test_smoke_runs_on_the_cpu_and_skips_cuda_here(trained, tmp_path):
    root, env, run, val_images = trained
    report = tmp_path / "smoke.json"
    image = sorted(val_images.iterdir())[0]
    result = run_cli(["smoke", str(run), "--image", str(image), "--devices", "cpu,cuda", "--output-json", str(report)],
                     env, root)
    assert result.returncode == 0, result.stdout + result.stderr
    devices = json.loads(report.read_text())["devices"]
    assert devices["cpu"]["status"] == "pass" and devices["cpu"]["inference_seconds"] > 0
    assert devices["cuda"]["status"] == "skip" and "CUDA" in devices["cuda"]["reason"]
