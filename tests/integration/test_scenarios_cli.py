"""`detpact test` through the real CLI: on one tiny trained run (every row printed, the
report in the run's contract, manifest, `runs verify` and report.html), on a predictions
file against a hand-made COCO ground truth (subsets only, exact mAPs; corruptions skipped
and said so), and bad settings as exit status 2."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from conftest import run_cli, train_tiny_run
from detpact import api
from detpact.run.contract import RunDir
from detpact.run.html import render_report

pytestmark = pytest.mark.slow

SETTINGS = {"seed": 1, "scenarios": [
    {"corruption": "gaussian_noise", "severities": [1, 5]},
    {"name": "occluded", "corruption": "occlusion", "severities": [3]},
    {"subset": "crowded", "min_objects": 2},
    {"subset": "truncated"},
    {"name": "stars", "subset": "classes", "classes": ["star", "cross"]},
]}
ROWS = ["gaussian_noise@1", "gaussian_noise@5", "occluded@3", "crowded", "truncated", "stars"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One tiny run trained for one epoch."""
    root = tmp_path_factory.mktemp("scenarios")
    env, run, _ = train_tiny_run(root, cache_dir, "--set", "train.epochs=1")
    settings = root / "scenarios.yaml"
    settings.write_text(yaml.safe_dump(SETTINGS))
    return root, env, run, settings


def test_a_run_is_scored_on_every_scenario_and_the_report_joins_the_run(trained):
    root, env, run, settings = trained
    result = run_cli(["test", str(settings), "--run", "tiny"], env, root)
    assert result.returncode == 0, result.stderr
    for name in ["clean", *ROWS]:
        assert f" {name} " in result.stdout, name
    assert "robustness: mPC" in result.stdout and "skipped" not in result.stdout

    report = json.loads((run / "reports" / "scenarios.json").read_text())
    assert [r["name"] for r in report["scenarios"]] == ROWS and report["skipped"] == []
    assert report["num_images"] == 6 and report["seed"] == 1 and report["source"]["checkpoint"] == "best"
    # The clean row is best.pt's validation, reproduced exactly (same evaluator, same determinism).
    best = max(json.loads(line)["map50_95"] for line in (run / "reports" / "val_metrics.jsonl").read_text().split())
    assert report["clean"]["map50_95"] == pytest.approx(best, abs=1e-9)
    noise = [r for r in report["scenarios"] if r["kind"] == "corruption"]
    assert [(r["corruption"], r["severity"], r["num_images"]) for r in noise] == [
        ("gaussian_noise", 1, 6), ("gaussian_noise", 5, 6), ("occlusion", 3, 6)]
    for row in noise:
        assert row["drop_map50_95"] == pytest.approx(report["clean"]["map50_95"] - row["map50_95"])
    assert report["summary"]["corruption_rows"] == 3
    assert report["summary"]["mpc"] == pytest.approx(sum(r["map50_95"] for r in noise) / 3)
    subsets = {r["name"]: r for r in report["scenarios"] if r["kind"] == "subset"}
    assert subsets["stars"]["params"] == {"classes": ["star", "cross"]}
    assert all(0 <= r["num_images"] <= 6 for r in subsets.values())

    manifest = json.loads((run / "manifest.json").read_text())["files"]
    digest = hashlib.sha256((run / "reports" / "scenarios.json").read_bytes()).hexdigest()
    assert manifest["reports/scenarios.json"]["sha256"] == digest
    # report.html gets the table (rendered here: the tiny run draws no report, to stay fast)
    page = render_report(RunDir(run), {})
    assert 'id="scenarios"' in page and "<td>gaussian_noise@5</td>" in page and "mPC" in page
    checks = api.verify(run, reevaluate=False)
    assert [c.name for c in checks if c.status == "fail"] == []
    assert any(c.name == "reports/scenarios.json" and c.status == "pass" for c in checks)


def coco_ground_truth() -> dict:
    """Three 100 x 100 images: one crowded (3 objects), one with a truncated box, one with a small box."""
    boxes = {1: [[10, 10, 40, 40, 1], [50, 10, 40, 40, 1], [10, 55, 40, 40, 2]],
             2: [[0, 20, 50, 50, 2]],
             3: [[40, 40, 20, 20, 1]]}
    annotations = [{"id": 10 * image + k, "image_id": image, "category_id": box[4], "bbox": box[:4],
                    "area": box[2] * box[3], "iscrowd": 0}
                   for image, rows in boxes.items() for k, box in enumerate(rows)]
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in boxes],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}


def test_predictions_are_scored_on_subsets_only_and_the_corruptions_are_skipped_with_the_reason(trained, tmp_path):
    root, env, _, settings = trained
    gt = coco_ground_truth()
    # Image 1 found perfectly, images 2 and 3 missed.
    results = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"] if a["image_id"] == 1]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    subsets = tmp_path / "subsets.yaml"
    subsets.write_text(yaml.safe_dump({"scenarios": [
        {"corruption": "blur"}, {"subset": "crowded", "min_objects": 3}, {"subset": "truncated"},
        {"subset": "small_objects"}, {"name": "dogs", "subset": "classes", "classes": ["dog"]}]}))
    out = tmp_path / "report.json"
    result = run_cli(["test", str(subsets), "--predictions", str(tmp_path / "results.json"),
                      "--gt", str(tmp_path / "gt.json"), "--out", str(out)], env, root)
    assert result.returncode == 0, result.stderr
    assert "skipped 3 corruption scenario(s) (blur@1, blur@3, blur@5)" in result.stdout
    assert "corruptions need the model" in result.stdout
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["skipped"]] == ["blur@1", "blur@3", "blur@5"] and report["summary"] is None
    rows = {r["name"]: (r["num_images"], r["map50_95"]) for r in report["scenarios"]}
    assert rows["crowded"] == (1, pytest.approx(1.0))       # image 1 only: all found
    assert rows["truncated"] == (1, pytest.approx(0.0))     # image 2 only: missed
    assert rows["small_objects"] == (1, pytest.approx(0.0))  # image 3 (20 x 20) only: missed
    assert rows["dogs"][0] == 2                             # images 1 and 2
    assert 0.0 < report["clean"]["map50_95"] < 1.0


def test_bad_settings_or_arguments_are_exit_status_2_without_a_traceback(trained, tmp_path):
    root, env, _, _ = trained
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenarios:\n  - {corruption: fog, severities: [9]}\n")
    result = run_cli(["test", str(bad), "--run", "tiny"], env, root)
    assert result.returncode == 2
    assert str(bad) in result.stderr and "scenarios[0].corruption" in result.stderr
    assert "Traceback" not in result.stderr
