"""The suite's parts: corrupted splits keep their boxes and are corrupted before the
letterbox; subset rows score exactly the selected images; mPC and rPC as COCO-C."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detpact.config import DataConfig, EvalConfig
from detpact.data.dataset import eval_loader
from detpact.data.formats import Sample
from detpact.data.transforms import letterbox
from detpact.evaluation.coco import ImageDetections
from detpact.robustness.corruptions import corrupt, image_seed
from detpact.robustness.settings import ScenarioSettings
from detpact.robustness.suite import CorruptedImages, Scorer, run_suite, summary


@pytest.fixture
def split(tmp_path: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i, (w, h) in enumerate([(80, 50), (40, 64), (64, 64)]):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        boxes = np.array([[2, 3, 30, 40], [0, 0, w, h]][: i + 1], np.float32)
        samples.append(Sample(path, w, h, boxes, np.zeros(len(boxes), np.int64)))
    return samples


def test_a_corrupted_split_is_corrupted_before_the_letterbox_and_keeps_its_boxes(split, tmp_path):
    cfg = DataConfig(format="yolo", path=str(tmp_path), image_size=32, num_workers=0)
    clean = list(eval_loader(split, cfg, batch_size=3))[0]
    images, targets = list(eval_loader(split, cfg, batch_size=3,
                                       cache=CorruptedImages(tmp_path, "gaussian_noise", 5, seed=3)))[0]
    for i, sample in enumerate(split):
        original = np.asarray(Image.open(sample.image_path).convert("RGB"))
        expected, _ = letterbox(Image.fromarray(corrupt(original, "gaussian_noise", 5,
                                                        image_seed(3, f"images/{i}.png"))), 32)
        assert torch.equal(images[i], torch.from_numpy(expected.transpose(2, 0, 1).copy()))
        assert not torch.equal(images[i], clean[0][i])
        for key in ("boxes", "labels"):
            assert torch.equal(targets[i][key], clean[1][i][key])
        assert (targets[i]["scale"], targets[i]["pad"]) == (clean[1][i]["scale"], clean[1][i]["pad"])


def perfect(samples: list[Sample]) -> list[ImageDetections]:
    return [ImageDetections(i, s.boxes.astype(np.float64), np.ones(len(s.boxes)), s.labels)
            for i, s in enumerate(samples)]


def test_subset_rows_score_only_the_selected_images_and_corruptions_skip_without_a_model(split):
    detections = perfect(split)
    detections[0] = ImageDetections(0, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))  # image 0: all missed
    scorer = Scorer(split, ["thing"], 100, EvalConfig())
    settings = ScenarioSettings.model_validate({"scenarios": [
        {"corruption": "blur", "severities": [2]}, {"subset": "crowded", "min_objects": 2},
        {"name": "all", "subset": "crowded", "min_objects": 1}, {"name": "none", "subset": "crowded", "min_objects": 9}]})
    report = run_suite(settings, split, ["thing"], scorer, detections, None, "no model", progress=False)
    assert report["skipped"] == [{"name": "blur@2", "kind": "corruption", "reason": "no model"}]
    crowd, everything, nothing = report["scenarios"]
    assert (crowd["num_images"], crowd["map50_95"]) == (2, pytest.approx(1.0))  # images 1 and 2: found
    assert everything["num_images"] == 3 and everything["map50_95"] == pytest.approx(report["clean"]["map50_95"])
    assert report["clean"]["map50_95"] < 0.9
    assert crowd["drop_map50_95"] == pytest.approx(report["clean"]["map50_95"] - 1.0)
    assert (nothing["num_images"], nothing["map50_95"], nothing["drop_map50_95"]) == (0, None, None)
    assert report["summary"] is None


def test_a_corruption_row_scores_what_the_predictor_returns(split):
    missed_all = [ImageDetections(i, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)) for i in range(3)]
    asked = []

    def predict(corruption: str, severity: int) -> list[ImageDetections]:
        asked.append((corruption, severity))
        return perfect(split) if severity == 1 else missed_all

    settings = ScenarioSettings.model_validate({"scenarios": [{"corruption": "jpeg", "severities": [1, 4]}]})
    report = run_suite(settings, split, ["thing"], Scorer(split, ["thing"], 100, EvalConfig()), perfect(split),
                       predict, progress=False)
    assert asked == [("jpeg", 1), ("jpeg", 4)]
    assert [r["map50_95"] for r in report["scenarios"]] == [pytest.approx(1.0), 0.0]
    assert report["summary"]["mpc"] == pytest.approx(0.5) and report["summary"]["rpc"] == pytest.approx(0.5)


def test_summary_is_the_mean_over_corruption_rows_only():
    rows = [{"kind": "corruption", "corruption": "blur", "map50_95": 0.6},
            {"kind": "corruption", "corruption": "blur", "map50_95": 0.2},
            {"kind": "corruption", "corruption": "jpeg", "map50_95": 0.7},
            {"kind": "subset", "map50_95": 0.0}]
    result = summary({"map50_95": 0.8}, rows)
    assert result["mpc"] == pytest.approx(0.5) and result["rpc"] == pytest.approx(0.625)
    assert result["corruption_rows"] == 3
    assert result["mean_map50_95_per_corruption"] == {"blur": pytest.approx(0.4), "jpeg": pytest.approx(0.7)}
    assert summary({"map50_95": 0.0}, rows)["rpc"] is None
