"""The ONNX parity gate passes a faithful export and fails a perturbed one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from detpact.config import ModelConfig, PostprocessConfig
from detpact.export.onnx import DeployModel, export_onnx
from detpact.export.parity import align_queries, check_parity, compare_detections, describe_failure
from detpact.models.detector import build_model


@pytest.fixture(scope="module", params=[64, 96], ids=["64px", "96px"])
def exported(tmp_path_factory, request):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"backbone": {"args": {"width_mult": 0.0625}}})
    model = build_model(cfg, 3)
    # An untrained model's eval-mode BatchNorm statistics (mean 0, var 1) squash the
    # signal to ~1e-9 by P5, so no weight would matter. Calibrate them on a batch.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 64, 64))
    deploy = DeployModel(model).eval()
    size = request.param  # the graph's input size is fixed at export: each size is its own export
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(deploy, path, image_size=size, opset=18, exporter="torchscript")
    images = np.random.default_rng(0).random((3, 3, size, size), dtype=np.float32)
    return deploy, path, images


def test_faithful_export_passes_both_gates(exported):
    deploy, path, images = exported
    report = check_parity(deploy, str(path), images, PostprocessConfig(), rtol=1e-3, atol=1e-5)
    assert report["verdict"] == "pass"
    assert {(c["session"], c["batch"]) for c in report["checks"]} == {
        ("ort_disable_all", 1), ("ort_disable_all", 3), ("ort_enable_all", 1), ("ort_enable_all", 3)}
    # float32 rounding only: sigmoid scores agree to ~1e-4 (4e-5 at 64 px), far below a 1 % weight change.
    assert all(c["outputs"]["scores"]["max_abs"] < 2e-4 for c in report["checks"])


def test_perturbed_weight_fails_the_gate(exported, tmp_path):
    deploy, path, images = exported
    model = onnx.load(str(path))
    # Nudge the largest conv weight of the graph: a silent export bug in miniature.
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights *= 1.01
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    report = check_parity(deploy, str(bad), images, PostprocessConfig(), rtol=1e-3, atol=1e-5)
    assert report["verdict"] == "fail"
    assert all(not c["pass"] for c in report["checks"])
    assert any(c["outputs"]["scores"]["pct_over_tolerance"] > 0 for c in report["checks"])
    message = describe_failure(report)
    assert message.startswith("raw outputs over tolerance: ") and "scores (max |diff|" in message


def _raw(boxes: list[list[float]], scores: list[float]) -> list[np.ndarray]:
    """Raw outputs of one image with one class: boxes [1, A, 4], scores [1, A, 1]."""
    return [np.array([boxes], dtype=np.float32), np.array([scores], dtype=np.float32)[..., None]]


# A suppresses B at IoU = B's height / 100; C (inside B, IoU 0.45 with A) is suppressed by B
# whenever B is kept; D stands apart. Scores rank A > B > C > D.
A, C, D = [0, 0, 100, 100], [0, 0, 100, 45], [200, 200, 250, 250]
SCORES = [0.9, 0.8, 0.7, 0.5]


def test_a_near_tie_at_the_iou_threshold_passes_with_its_knock_on_effect():
    # The bf16 raccoon case in miniature: 1e-3 px of box noise puts B's IoU with A on either
    # side of 0.6, so torch suppresses B and keeps C, onnxruntime keeps B, which drops C.
    torch_raw = _raw([A, [0, 0, 100, 60.001], C, D], SCORES)
    ort_raw = _raw([A, [0, 0, 100, 59.999], C, D], SCORES)
    post = PostprocessConfig(iou_threshold=0.6)
    result = compare_detections(ort_raw, torch_raw, post)
    assert result["pass"], result
    assert result["nms_ties_not_required"] == 2 and result["unmatched"] == 0
    # The raw gate alone would pass these outputs too: the flip is pure NMS.
    assert np.abs(ort_raw[0] - torch_raw[0]).max() < 3e-3


def test_a_detection_kept_on_one_side_without_a_tie_fails_and_is_named():
    torch_raw = _raw([A, [0, 0, 100, 60.001], C, D], SCORES)
    ort_raw = _raw([A, [0, 0, 100, 50.0], C, D], SCORES)  # IoU 0.5: clearly kept, no tie
    result = compare_detections(ort_raw, torch_raw, PostprocessConfig(iou_threshold=0.6))
    assert not result["pass"]
    # B has no excuse, so neither has C, which B suppresses.
    assert result["kept_on_one_side_only"] == 2 and result["nms_ties_not_required"] == 0
    assert "location 1 class 0" in result["examples"][0] and "onnxruntime only" in result["examples"][0]


def test_a_changed_score_of_a_detection_kept_on_both_sides_fails():
    scores = [0.9, 0.8, 0.7, 0.45]  # D's score moved by 0.05
    result = compare_detections(_raw([A, [0, 0, 100, 60.001], C, D], scores),
                                _raw([A, [0, 0, 100, 60.001], C, D], SCORES), PostprocessConfig(iou_threshold=0.6))
    assert not result["pass"] and result["changed"] == 1
    assert "location 3 class 0 differs" in result["examples"][0]


def test_swapped_queries_are_realigned_and_a_changed_query_still_fails():
    rng = np.random.default_rng(0)
    boxes = rng.random((2, 6, 4)).astype(np.float32) * 64
    scores = rng.random((2, 6, 3)).astype(np.float32)
    swapped = [boxes.copy(), scores.copy()]
    for out in swapped:  # image 1: queries 2 and 3 swap ranks (a score tie in the encoder)
        out[1, [2, 3]] = out[1, [3, 2]]
    aligned, moved = align_queries(swapped, [boxes, scores], 1e-3, 1e-5, [64.0, 0.0])
    assert moved == 2
    np.testing.assert_array_equal(aligned[0], boxes)
    np.testing.assert_array_equal(aligned[1], scores)
    assert align_queries([boxes, scores], [boxes, scores], 1e-3, 1e-5, [64.0, 0.0])[1] == 0

    changed = [boxes.copy(), scores.copy()]
    changed[0][0, 4] += 5.0  # a query that differs is no permutation of the reference
    aligned, _ = align_queries(changed, [boxes, scores], 1e-3, 1e-5, [64.0, 0.0])
    assert np.abs(aligned[0] - boxes).max() >= 5.0


def test_a_tie_at_the_score_cutoff_passes_but_a_score_moved_across_it_fails():
    post = PostprocessConfig(score_threshold=0.5)
    tie = compare_detections(_raw([A, D], [0.9, 0.5004]), _raw([A, D], [0.9, 0.4996]), post)
    assert tie["pass"] and tie["near_cutoff_not_required"] == 1
    moved = compare_detections(_raw([A, D], [0.9, 0.3]), _raw([A, D], [0.9, 0.7]), post)  # torch keeps D, ORT not
    assert not moved["pass"] and moved["kept_on_one_side_only"] == 1
