"""The report's parts without training: the confusion matrix, the PR curves the evaluator
returns, each plot, and report.html built from a run folder written by hand."""

from __future__ import annotations

import base64
import json
import logging
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from detpact.config import EvalConfig
from detpact.data.formats import Sample
from detpact.engine.evaluate import ground_truth
from detpact.evaluation.coco import evaluate_detections
from detpact.evaluation.confusion import confusion_matrix
from detpact.evaluation.records import ImageDetections, ImageGT
from detpact.run import plots
from detpact.run.contract import PLOT_NAMES, RunDir, read_manifest
from detpact.run.reporting import EVALUATION_PLOTS, ValEvaluation, write_reports

NAMES = ["cat", "dog", "<b>$x$</b>"]  # a name that is HTML and mathtext at once


def gt(image_id, boxes, labels, crowd=None):
    return ImageGT(image_id, 100, 100, np.array(boxes, np.float64).reshape(-1, 4), np.array(labels, np.int64),
                   None if crowd is None else np.array(crowd, bool))


def det(image_id, boxes, scores, labels):
    return ImageDetections(image_id, np.array(boxes, np.float64).reshape(-1, 4), np.array(scores, np.float64),
                           np.array(labels, np.int64))


def test_confusion_matrix_counts_matches_confusions_misses_and_false_positives():
    gts = [gt(0, [[0, 0, 10, 10], [50, 50, 70, 70], [80, 0, 99, 20]], [0, 1, 2]),
           gt(1, [[0, 0, 30, 30], [40, 40, 90, 90]], [1, 0], crowd=[False, True])]
    dets = [det(0, [[0, 0, 10, 10], [50, 50, 70, 71], [20, 20, 30, 30], [0, 0, 10, 11]], [0.9, 0.8, 0.7, 0.1],
                [0, 0, 2, 1]),  # right; dog taken for a cat; on nothing; below the score threshold
            det(1, [[45, 45, 85, 85], [0, 0, 30, 30]], [0.9, 0.6], [2, 1])]  # on the crowd box: not counted
    matrix = confusion_matrix(gts, dets, 3, score_threshold=0.25, iou_threshold=0.5)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = 1  # cat=cat, cat for a dog, dog=dog (image 1)
    expected[2, 3] = 1  # a detection on nothing
    expected[3, 2] = 1  # the third box missed
    np.testing.assert_array_equal(matrix, expected)
    # every non-crowd box is counted once, in its true class's column
    assert matrix[:, :3].sum(0).tolist() == [1, 2, 1]


def test_confusion_matrix_of_no_detections_misses_every_box():
    gts = [gt(0, [[0, 0, 10, 10]], [1]), gt(1, [], [])]
    matrix = confusion_matrix(gts, [], 2)
    assert matrix[2].tolist() == [0, 1, 0] and matrix.sum() == 1


def test_pr_curves_average_to_each_class_ap50():
    rng = np.random.default_rng(0)
    gts, dets = [], []
    for i in range(12):
        boxes = np.sort(rng.uniform(0, 90, (3, 4)).reshape(3, 2, 2), axis=1).reshape(3, 4) + [0, 0, 8, 8]
        labels = rng.integers(0, 2, 3)
        gts.append(ImageGT(i, 100, 100, boxes, labels))
        noisy = boxes + rng.normal(0, 3, boxes.shape)
        dets.append(ImageDetections(i, noisy, rng.uniform(0.1, 1, 3), np.where(rng.random(3) < 0.2, 1 - labels,
                                                                                  labels)))
    metrics = evaluate_detections(gts, dets, ["a", "b", "never"], curves=True)
    curves = metrics["pr_curves"]
    assert len(curves["recall"]) == 101 and curves["iou"] == 0.5 and curves["precision"]["never"] is None
    for name in ("a", "b"):
        assert np.mean(curves["precision"][name]) == pytest.approx(metrics["per_class_ap50"][name], abs=1e-12)
    assert "pr_curves" not in evaluate_detections(gts, dets, ["a", "b", "never"])


def train_rows(steps=150):
    return [{"step": s, "epoch": s // 50, "lr": 1e-3 * min(1, s / 20), "loss": 5 / s ** 0.5,
             "loss_cls": 3 / s ** 0.5, "loss_box": 0.02 + 1 / s, "grad_norm": 10 / s ** 0.3} for s in range(1, steps + 1)]


def val_rows():
    return [{"step": s, "epoch": s // 50, "map50_95": s / 400, "map50": s / 200, "map75": s / 500,
             "per_class": {n: 0.1 for n in NAMES}, "per_class_ap50": {n: 0.2 for n in NAMES}}
            for s in (50, 100, 150)]


def assert_png_has_content(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200
        assert np.asarray(image.convert("L"), np.float64).std() > 5  # not one flat colour


def test_plots_refuse_empty_data_and_write_nothing(tmp_path):
    skipped_steps = [{"step": 1, "lr": 0.1, "loss": None, "grad_norm": None}]  # a non-finite step logs None
    curves = {"iou": 0.5, "recall": [0.0, 1.0], "precision": {"cat": None}}
    for draw in (lambda p: plots.plot_losses([], p), lambda p: plots.plot_lr([], p),
                 lambda p: plots.plot_grad_norm(skipped_steps, p),
                 lambda p: plots.plot_val_map([{"step": 5, "map50_95": None}], p),
                 lambda p: plots.plot_pr_curves(curves, p),
                 lambda p: plots.plot_confusion(np.zeros((3, 3), int), ["a", "b"], p, 0.25, 0.5),
                 lambda p: plots.plot_val_images([], [], ["a"], p, 0.25)):
        with pytest.raises(plots.NoData):
            draw(tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def fake_run(tmp_path) -> tuple[RunDir, ValEvaluation]:
    """A run folder as training leaves it (metric logs, config, meta), without training,
    and an evaluation of two validation images."""
    run = RunDir(tmp_path / "run<1>")
    run.create()
    run.train_metrics.write_text("".join(json.dumps(r) + "\n" for r in train_rows(40)))
    run.val_metrics.write_text("".join(json.dumps(r) + "\n" for r in val_rows()))
    run.config_resolved.write_text(yaml.safe_dump({"config_version": 1, "run": {"name": "<script>alert(1)</script>"}}))
    run.run_meta.write_text(json.dumps({"run_id": "x", "config_hash": "abc", "dataset": {
        "mode": "yolo", "root": "/data/<i>", "num_train": 3, "num_val": 2, "class_names": NAMES}}))
    run.onnx_parity.write_text(json.dumps({"verdict": "pass", "policy": "fail", "num_images": 2}))
    samples = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8)).save(path)
        samples.append(Sample(path, 64, 48, np.array([[4, 4, 30, 30]], np.float32), np.array([i], np.int64)))
    detections = [det(0, [[5, 5, 30, 30]], [0.9], [0]), det(1, [[30, 20, 60, 40]], [0.8], [2])]
    curves = evaluate_detections(ground_truth(samples), detections, NAMES, curves=True)["pr_curves"]
    return run, ValEvaluation("best.pt at step 150, 2 validation images", samples, detections, curves, NAMES,
                              EvalConfig())


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The fake run with its reports written (every plot drawn once for the module)."""
    run, evaluation = fake_run(tmp_path_factory.mktemp("report"))
    return run, write_reports(run, evaluation)


def test_report_html_embeds_every_plot_escapes_run_text_and_links_nothing(reported):
    run, outcome = reported
    assert outcome.failed == [] and outcome.skipped == {} and outcome.drawn == list(PLOT_NAMES)
    for name in PLOT_NAMES:
        assert_png_has_content(run.plot(name))
    page = run.report_html.read_text()
    for name in PLOT_NAMES:
        assert base64.b64encode(run.plot(name).read_bytes()).decode() in page, name
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;$x$&lt;/b&gt;" in page and "/data/&lt;i&gt;" in page and "run&lt;1&gt;" in page
    without_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)
    assert re.findall(r"(?:src|href)\s*=\s*\"(?!data:|#)[^\"]*\"", without_data) == []
    assert "//" not in without_data and "url(" not in without_data and "@import" not in without_data
    listed = read_manifest(run)
    assert {f"reports/plot_{name}.png" for name in PLOT_NAMES} | {"reports/report.html"} <= set(listed)


def test_a_report_redrawn_without_evaluating_keeps_the_evaluation_plots_captions(tmp_path):
    run, evaluation = fake_run(tmp_path)
    write_reports(run, evaluation)
    assert {name: plots.caption_of(run.plot(name)) for name in EVALUATION_PLOTS} == dict.fromkeys(EVALUATION_PLOTS,
                                                                                            evaluation.source)
    outcome = write_reports(run, None, missing_evaluation="not evaluated here")  # as `detpact test` redraws it
    assert outcome.skipped == {} and outcome.failed == []
    page = run.report_html.read_text()
    assert page.count(f"&middot; {evaluation.source}") == len(EVALUATION_PLOTS)
    assert plots.caption_of(run.plot("loss")) is None  # training curves carry no evaluation caption


def test_a_failing_plot_is_a_warning_and_the_rest_is_still_written(tmp_path, monkeypatch, caplog):
    run, _ = fake_run(tmp_path)
    run.train_metrics.write_text("")  # no steps: the training curves have nothing to draw

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(plots, "plot_val_map", broken)
    with caplog.at_level(logging.WARNING):
        outcome = write_reports(run, None, missing_evaluation="not evaluated here")
    assert outcome.failed == ["val_map"] and outcome.drawn == [] and outcome.html == run.report_html
    assert outcome.skipped["loss"] == "no training step logged" and outcome.skipped["confusion"] == "not evaluated here"
    assert any("val_map plot" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    page = run.report_html.read_text()
    assert "Validation mAP &middot; failed: renderer exploded: not drawn" in page and "data:image" not in page
