"""The run contract end to end through the real CLI, in subprocesses:
train -> crash -> resume -> eval -> export -> predict on a tiny synthetic config. The
commands that train nothing (model info, predictions, eval --predictions) run the same
CLI entry point in this process, which saves an interpreter start each."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATASETS, run_cli
from detpact.evaluation.coco import HEADLINE_KEYS
from detpact.launch import main
from detpact.run.checkpoint import inference_state_dict

CONTRACT = [
    "checkpoints/last.pt", "checkpoints/best.pt", "reports/train_metrics.jsonl", "reports/val_metrics.jsonl",
    "reports/config_resolved.yaml", "reports/run_meta.json", "reports/train_report.json",
    "reports/train_report.md", "reports/onnx_parity.json", "exports/model.onnx",
    "exports/model.onnx.meta.json", "manifest.json", "status.json",
]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    bundle = torch.load(path, weights_only=True)
    return {**{f"model.{k}": v for k, v in bundle["model"].items()},
            **{f"ema.{k}": v for k, v in bundle["ema"]["module"].items()}}


@pytest.mark.slow
def test_train_crash_resume_eval_export_predict(tmp_path, env, tiny_config):
    run = tmp_path / "runs" / "e2e"
    sets = ["--set", "train.checkpoint.every_steps=2", "--set", "export.onnx=true"]
    # Checkpoint every 2 steps; SIGKILL right after step 5 (its line logged, not checkpointed).
    crash = run_cli(["train", str(tiny_config), "--run-id", "e2e", *sets], {**env, "DETPACT_FAULT": "kill@step=5"},
                    tmp_path)
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert len(read_jsonl(run / "reports" / "train_metrics.jsonl")) == 5
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["global_step"] == 4

    # Resume with a different config is refused, naming the differing key.
    drift = run_cli(["train", str(tiny_config), "--run-id", "e2e", "--resume", *sets, "--set",
                     "train.optimizer.lr=0.01"], env, tmp_path)
    assert drift.returncode == 2 and "train.optimizer.lr" in drift.stderr and "Traceback" not in drift.stderr

    resumed = run_cli(["train", str(tiny_config), "--run-id", "e2e", "--resume", *sets], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run directory: {run}" in resumed.stdout
    steps = [r["step"] for r in read_jsonl(run / "reports" / "train_metrics.jsonl")]
    assert steps == list(range(1, 7))  # 2 epochs x 3 steps, each exactly once across the crash
    val = read_jsonl(run / "reports" / "val_metrics.jsonl")
    assert [r["step"] for r in val] == [3, 6] and all("per_class" in r for r in val)
    for rel in CONTRACT:
        assert (run / rel).is_file(), rel
    status = json.loads((run / "status.json").read_text())
    assert status["phase"] == "done" and status["step"] == 6 and "map50" in status["last_val"]
    meta = json.loads((run / "reports" / "run_meta.json").read_text())
    assert len(meta["resumes"]) == 1 and meta["dataset"]["mode"] == "synthetic"
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["dataset"]["mode"] == "synthetic" and report["counters"]["steps"] == 6
    assert report["resumed_from_step"] == 4
    losses = [r["loss"] for r in read_jsonl(run / "reports" / "train_metrics.jsonl")]
    assert report["loss"]["first10"] == pytest.approx(sum(losses) / len(losses))  # both sessions, not just the last

    # The resumed run ends exactly (bit for bit) where an uninterrupted run ends.
    straight = run_cli(["train", str(tiny_config), "--run-id", "straight", "--set",
                        "train.checkpoint.every_steps=2"], env, tmp_path)  # export settings do not touch training
    assert straight.returncode == 0, straight.stderr
    ours, theirs = weights(run / "checkpoints" / "last.pt"), weights(tmp_path / "runs" / "straight" / "checkpoints" / "last.pt")
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    straight_losses = [r["loss"] for r in read_jsonl(tmp_path / "runs" / "straight" / "reports" / "train_metrics.jsonl")]
    assert [r["loss"] for r in read_jsonl(run / "reports" / "train_metrics.jsonl")] == straight_losses

    # eval of best.pt reproduces the best validation line of training.
    evaluated = run_cli(["eval", str(run), "--json"], env, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    best = max(val, key=lambda r: r["map50_95"])
    assert metrics["map50_95"] == pytest.approx(best["map50_95"], abs=1e-9)
    assert json.loads((run / "reports" / "eval_best.json").read_text())["metrics"]["map50"] == metrics["map50"]
    table = run_cli(["eval", str(run)], env, tmp_path)
    assert "AP @[.50:.95]" in table.stdout and "circle" in table.stdout

    # export (default dynamo exporter) with its parity gate.
    exported = run_cli(["export", str(run)], env, tmp_path)
    assert exported.returncode == 0, exported.stderr
    parity = json.loads((run / "reports" / "onnx_parity.json").read_text())
    assert parity["verdict"] == "pass" and parity["num_images"] == 3
    assert {c["batch"] for c in parity["checks"]} == {1, 3}
    onnx_meta = json.loads((run / "exports" / "model.onnx.meta.json").read_text())
    assert onnx_meta["exporter"] == "dynamo" and onnx_meta["class_names"][0] == "circle"
    assert not list((run / "exports").glob("*.data"))  # weights embedded: one self-contained file
    old_opset = run_cli(["export", str(run), "--opset", "17"], env, tmp_path)  # dynamo writes opset >= 18
    assert old_opset.returncode == 2 and "export.exporter: torchscript" in old_opset.stderr

    # predict on real files: a folder of val images plus one named image.
    val_images = Path(meta["dataset"]["root"]) / "images" / "val"
    one = sorted(val_images.iterdir())[0]
    out = tmp_path / "preds.json"
    predicted = run_cli(["predict", str(run), str(val_images), str(one), "--out", str(out),
                         "--save-images", str(tmp_path / "drawn"), "--conf", "0.01"], env, tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    preds = json.loads(out.read_text())
    assert (preds["schema"], preds["version"]) == ("detpact.predictions", 1)
    assert len(preds["predictions"]) == 7 and preds["meta"]["class_names"][:2] == ["circle", "square"]
    detections = [d for image in preds["predictions"] for d in image["detections"]]
    assert detections, "a trained model finds something at conf 0.01"
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64
        assert preds["meta"]["class_names"][det["class_id"]] == det["class_name"] and 0.01 <= det["score"] <= 1
    validated = run_cli(["predictions", "validate", str(out)], env, tmp_path)  # its own output validates
    assert validated.returncode == 0 and f"valid: 7 images, {len(detections)} detections" in validated.stdout
    assert len(list((tmp_path / "drawn").glob("*.png"))) == 7

    # The manifest covers every artifact, with correct hashes.
    manifest = json.loads((run / "manifest.json").read_text())["files"]
    for rel in CONTRACT[:-2] + ["reports/eval_best.json"]:
        assert manifest[rel]["sha256"] == hashlib.sha256((run / rel).read_bytes()).hexdigest(), rel


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_abort(tmp_path, env, tiny_config):
    run = tmp_path / "runs" / "nan"
    skipped = run_cli(["train", str(tiny_config), "--run-id", "nan", "--set", "train.epochs=1"],
                      {**env, "DETPACT_FAULT": "nan@step=2"}, tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    lines = read_jsonl(run / "reports" / "train_metrics.jsonl")
    assert [r["skipped"] for r in lines] == [False, True, False]
    assert [r["skip_reason"] for r in lines] == [None, "nan", None]
    assert lines[-1]["nonfinite_skipped"] == 1
    counters = json.loads((run / "reports" / "train_report.json").read_text())["counters"]
    assert (counters["nan_steps"], counters["inf_steps"], counters["oom_steps"]) == (1, 0, 0)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())

    aborted = run_cli(["train", str(tiny_config), "--run-id", "abort", "--set", "train.epochs=2", "--set",
                       "train.nonfinite.max_consecutive=2"], {**env, "DETPACT_FAULT": "nan@step=4..5"}, tmp_path)
    assert aborted.returncode == 3, aborted.stderr
    assert "not finite for 2 step(s) in a row" in aborted.stderr and "Traceback" not in aborted.stderr
    abort_run = tmp_path / "runs" / "abort"
    assert len(read_jsonl(abort_run / "reports" / "train_metrics.jsonl")) == 5  # nothing written is lost
    kept = torch.load(abort_run / "checkpoints" / "last.pt", weights_only=True)  # the epoch-1 checkpoint stays,
    assert kept["progress"]["global_step"] == 3  # finite and matching its manifest entry
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    kept_entry = json.loads((abort_run / "manifest.json").read_text())["files"]["checkpoints/last.pt"]
    assert kept_entry["sha256"] == hashlib.sha256((abort_run / "checkpoints" / "last.pt").read_bytes()).hexdigest()
    status = json.loads((abort_run / "status.json").read_text())
    assert (status["phase"], status["end_reason"]) == ("failed", "nonfinite_abort")
    report = json.loads((abort_run / "reports" / "train_report.json").read_text())
    assert report["end_reason"] == "nonfinite_abort" and report["counters"]["nan_steps"] == 2

    # Out of memory in a step (one process): skipped and counted like a non-finite one.
    oom = run_cli(["train", str(tiny_config), "--run-id", "oom", "--set", "train.epochs=1"],
                  {**env, "DETPACT_FAULT": "oom@step=3"}, tmp_path)
    assert oom.returncode == 0 and "step 3: out of memory; the step is skipped" in oom.stderr, oom.stderr
    lines = read_jsonl(tmp_path / "runs" / "oom" / "reports" / "train_metrics.jsonl")
    assert [r["skip_reason"] for r in lines] == [None, None, "oom"]
    counters = json.loads((tmp_path / "runs" / "oom" / "reports" / "train_report.json").read_text())["counters"]
    assert (counters["nan_steps"], counters["oom_steps"], counters["nonfinite_skipped"]) == (0, 1, 1)

    # policy abort: the first non-finite step ends the run, whatever max_consecutive says.
    strict = run_cli(["train", str(tiny_config), "--run-id", "strict", "--set", "train.epochs=2", "--set",
                      "train.nonfinite={policy: abort, max_consecutive: 5}"], {**env, "DETPACT_FAULT": "nan@step=4"},
                     tmp_path)
    assert strict.returncode == 3 and "Training aborted at step 4" in strict.stderr, strict.stderr
    assert len(read_jsonl(tmp_path / "runs" / "strict" / "reports" / "train_metrics.jsonl")) == 4


@pytest.mark.slow
def test_a_failed_parity_gate_is_reported_alike_by_train_status_and_verify(tmp_path, env, tiny_config):
    # Tolerances no float32 engine meets: the gate must fail on the raw outputs and say so.
    failed = run_cli(["train", str(tiny_config), "--run-id", "strict", "--set", "train.epochs=1", "--set",
                      "export.onnx=true", "--set", "export.exporter=torchscript", "--set", "export.parity_rtol=1e-12",
                      "--set", "export.parity_atol=1e-12"], env, tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert "raw outputs over tolerance: boxes" in failed.stderr and "Traceback" not in failed.stderr
    run = tmp_path / "runs" / "strict"
    status = json.loads((run / "status.json").read_text())
    assert status["phase"] == "export_failed" and "parity check failed" in status["error"]
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "reports" / "train_report.json").is_file()

    verified = run_cli(["runs", "verify", str(run), "--no-eval", "--json"], env, tmp_path)
    assert verified.returncode == 1, verified.stderr
    checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
    assert checks["ONNX parity"]["status"] == "fail" and "raw outputs over tolerance" in checks["ONNX parity"]["detail"]
    assert checks["status.json"]["status"] == "fail" and "training finished" in checks["status.json"]["detail"]


REPO = Path(__file__).resolve().parents[2]


def in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`detpact ARGS` in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_model_info_reports_the_configured_detector(capsys):
    code, out, err = in_process(["model", "info", str(REPO / "configs" / "rtdetr_quickstart.yaml"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert (report["backbone"], report["neck"], report["head"], report["num_classes"]) == ("cspdarknet", "none",
                                                                                          "rtdetr", 5)
    assert report["params"] == sum(report["params_by_part"].values()) and report["gflops"] > 0.1
    assert [level["stride"] for level in report["levels"]] == [8, 16, 32]
    assert report["outputs"]["boxes"] == [1, 100, 4] and report["outputs"]["decoding"] == "top-k (NMS-free)"
    assert report["cpu_forward_ms"] > 0

    code, out, err = in_process(["model", "info", str(REPO / "configs" / "quickstart.yaml"), "--num-classes", "80",
                                 "--image-size", "320", "--set", "model.backbone.name=resnet18"], capsys)
    assert code == 0, err
    assert "resnet18 + pan neck + dense head, 80 classes" in out and "at 320x320" in out
    assert "stride 32, 512 ch" in out and "decoded by NMS" in out

    for bad, message in ((["--image-size", "100"], "multiple of 32"),
                         (["--set", "model.backbone.name=resnet99"], "choices: tiny_cnn, cspdarknet")):
        code, _, err = in_process(["model", "info", str(REPO / "configs" / "quickstart.yaml"), *bad], capsys)
        assert code == 2 and message in err and "Traceback" not in err


def test_detpact_seed_overrides_the_config_and_is_recorded_and_metrics_csv(tmp_path, env, tiny_config):
    short = ["--set", "train.max_steps=1", "--set", "train.epochs=1"]
    seeded = run_cli(["train", str(tiny_config), "--run-id", "env_seed", *short, "--set", "logging.metrics_csv=true"],
                     {**env, "DETPACT_SEED": "7"}, tmp_path)
    assert seeded.returncode == 0, seeded.stderr
    # logging.metrics_csv mirrors the step log as CSV, listed in the manifest.
    reports = tmp_path / "runs" / "env_seed" / "reports"
    with (reports / "train_metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    steps = read_jsonl(reports / "train_metrics.jsonl")
    assert [int(r["step"]) for r in rows] == [s["step"] for s in steps] and float(rows[0]["loss"]) == steps[0]["loss"]
    manifest = json.loads((tmp_path / "runs" / "env_seed" / "manifest.json").read_text())["files"]
    assert "reports/train_metrics.csv" in manifest
    meta = json.loads((tmp_path / "runs" / "env_seed" / "reports" / "run_meta.json").read_text())
    assert (meta["seed"], meta["seed_source"]) == (7, "DETPACT_SEED")
    assert "seed: 7" in (tmp_path / "runs" / "env_seed" / "reports" / "config_resolved.yaml").read_text()

    explicit = run_cli(["train", str(tiny_config), "--run-id", "set_seed", *short, "--set", "run.seed=5"],
                       {**env, "DETPACT_SEED": "7"}, tmp_path)
    assert explicit.returncode == 0, explicit.stderr
    meta = json.loads((tmp_path / "runs" / "set_seed" / "reports" / "run_meta.json").read_text())
    assert (meta["seed"], meta["seed_source"]) == (5, "--set")  # the command line wins

    bad = run_cli(["train", str(tiny_config), "--run-id", "bad_seed", *short], {**env, "DETPACT_SEED": "x"}, tmp_path)
    assert bad.returncode == 2 and "DETPACT_SEED must be an integer" in bad.stderr and "Traceback" not in bad.stderr


def test_ema_eval_off_validates_and_exports_the_raw_weights(tmp_path, env, tiny_config):
    for run_id, extra in (("raw", ["--set", "train.ema.eval=false"]), ("ema", [])):
        trained = run_cli(["train", str(tiny_config), "--run-id", run_id, "--set", "train.epochs=1", *extra], env,
                          tmp_path)
        assert trained.returncode == 0, trained.stderr
    raw, ema = tmp_path / "runs" / "raw", tmp_path / "runs" / "ema"
    # Both runs train the same weights; only what they validate differs. A 3-step model scores
    # 0 mAP, but its detections (kept at score 0.001) depend on every weight.
    recorded = {run.name: read_jsonl(run / "reports" / "val_metrics.jsonl")[-1]["num_dets"] for run in (raw, ema)}
    assert recorded["raw"] != recorded["ema"], recorded
    bundle = torch.load(raw / "checkpoints" / "best.pt", weights_only=True)
    assert bundle["ema"] is not None and inference_state_dict(bundle) is bundle["model"]  # EMA kept, not used
    evaluated = run_cli(["eval", str(raw), "--json"], env, tmp_path)
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["num_dets"] == recorded["raw"], evaluated.stderr
    verified = run_cli(["runs", "verify", str(raw)], env, tmp_path)
    assert verified.returncode == 0 and "verify: PASS" in verified.stdout, verified.stdout + verified.stderr


def test_predictions_validate_and_convert_commands(tmp_path, capsys):
    fixture = SHARED_DATASETS / "coco_eval_fixtures" / "fce_small"
    detpact_file, coco_file = tmp_path / "preds.json", tmp_path / "results.json"
    code, _, err = in_process(["predictions", "convert", str(fixture / "dt_dataset.json"), "--to", "detpact", "--gt",
                               str(fixture / "gt_dataset.json"), "--out", str(detpact_file)], capsys)
    assert code == 0, err
    code, out, err = in_process(["predictions", "convert", str(detpact_file), "--to", "coco", "--gt",
                                 str(fixture / "gt_dataset.json"), "--out", str(coco_file)], capsys)
    assert code == 0, err
    original = json.loads((fixture / "dt_dataset.json").read_text())
    assert len(json.loads(coco_file.read_text())) == len(original) and f"{len(original)} detections" in out

    document = json.loads(detpact_file.read_text())
    document["predictions"][1]["detections"][0]["score"] = "high"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    code, _, err = in_process(["predictions", "validate", str(broken)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "predictions[1].detections[0].score" in err and str(broken) in err


@pytest.mark.parametrize(("gt", "dt"), [("val2014_100/instances_val2014_100.json",
                                         "val2014_100/instances_val2014_fakebbox100_results.json"),
                                        ("fce_small/gt_dataset.json", "fce_small/dt_dataset.json")])
def test_eval_predictions_reproduces_pycocotools(tmp_path, capsys, gt, dt):
    """`detpact eval --predictions` on COCO results JSON, and on the same detections as a
    detpact predictions file, gives pycocotools' 12 stats (its own full-precision run,
    recorded in the fixtures) within 1e-12."""
    fixtures = SHARED_DATASETS / "coco_eval_fixtures"
    reference = next(r for r in json.loads((fixtures / "pycocotools_reference_stats.json").read_text())["runs"]
                     if (r["gt"], r["dt"], r["iouType"]) == (gt, dt, "bbox") and "variant" not in r)
    ours = tmp_path / "preds.json"
    code, _, err = in_process(["predictions", "convert", str(fixtures / dt), "--to", "detpact", "--gt",
                               str(fixtures / gt), "--out", str(ours)], capsys)
    assert code == 0, err
    for predictions in (fixtures / dt, ours):
        code, out, err = in_process(["eval", "--predictions", str(predictions), "--gt", str(fixtures / gt), "--json",
                                     "--out", str(tmp_path / "eval.json")], capsys)
        assert code == 0, err
        metrics = json.loads(out)
        stats = [-1.0 if metrics[k] is None else metrics[k] for k in HEADLINE_KEYS]
        assert stats == pytest.approx(list(reference["stats"].values()), abs=1e-12, rel=0), predictions
        assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == metrics


def edge_case_coco(rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """COCO ground truth and results with what trips evaluators up: crowd regions, images
    without boxes, a category without ground truth (but with detections), an image with
    more than 100 detections of one class, and tied scores."""
    categories = [{"id": c, "name": f"class{c}"} for c in (1, 2, 3, 7)]  # 7: no ground truth
    images, annotations, results = [], [], []
    for image_id in range(1, 31):
        images.append({"id": image_id, "width": 320, "height": 240, "file_name": f"img{image_id:03d}.jpg"})
        count = 0 if image_id % 7 == 0 else int(rng.integers(1, 8))  # every 7th image is empty
        for _ in range(count):
            x, y = rng.uniform(0, 250), rng.uniform(0, 180)
            w, h = rng.uniform(4, 70), rng.uniform(4, 60)
            crowd = int(rng.random() < 0.1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})
    for ann in annotations:  # a hit (jittered), sometimes twice, with coarse (tied) scores
        for _ in range(int(rng.integers(1, 3))):
            x, y, w, h = (v + rng.normal(0, 2) for v in ann["bbox"])
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": [x, y, max(w, 1), max(h, 1)], "score": round(float(rng.random()), 1)})
    for image_id in (3, 4):  # more than 100 detections of one class on one image
        for _ in range(130):
            results.append({"image_id": image_id, "category_id": 2, "score": float(rng.choice([0.3, 0.5, 0.7])),
                            "bbox": [rng.uniform(0, 250), rng.uniform(0, 180), rng.uniform(5, 60), rng.uniform(5, 60)]})
    for image_id in range(1, 31, 3):  # false positives everywhere, some on the category without GT
        results.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 7])), "score": 0.5,
                        "bbox": [rng.uniform(0, 250), rng.uniform(0, 180), 20.0, 20.0]})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def pycocotools_stats(gt_path: Path, results_path: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def test_eval_predictions_equals_pycocotools_on_generated_edge_cases(tmp_path, capsys):
    gt, results = edge_case_coco(np.random.default_rng(7))
    assert max(Counter((r["image_id"], r["category_id"]) for r in results).values()) > 100
    assert any(a["iscrowd"] for a in gt["annotations"]) and len({r["score"] for r in results}) < len(results) / 10
    gt_path, results_path, ours = tmp_path / "gt.json", tmp_path / "results.json", tmp_path / "preds.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))
    reference = pycocotools_stats(gt_path, results_path)
    code, _, err = in_process(["predictions", "convert", str(results_path), "--to", "detpact", "--gt", str(gt_path),
                               "--out", str(ours)], capsys)
    assert code == 0, err
    for predictions in (results_path, ours):
        code, out, err = in_process(["eval", "--predictions", str(predictions), "--gt", str(gt_path), "--json"], capsys)
        assert code == 0, err
        metrics = json.loads(out)
        stats = [-1.0 if metrics[k] is None else metrics[k] for k in HEADLINE_KEYS]
        assert stats == pytest.approx(reference, abs=1e-12, rel=0), predictions
        assert metrics["per_class"]["class7"] is None and metrics["no_gt_class_dets"]["class7"] > 0
