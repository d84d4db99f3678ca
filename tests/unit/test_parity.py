"""The ONNX parity gate passes a faithful export and fails a perturbed one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from detpact.config import ModelConfig, PostprocessConfig
from detpact.export.onnx import DeployModel, export_onnx
from detpact.export.parity import check_parity
from detpact.models.detector import build_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
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
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(deploy, path, image_size=64, opset=18, exporter="torchscript")
    images = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    return deploy, path, images


def test_faithful_export_passes_both_gates(exported):
    deploy, path, images = exported
    report = check_parity(deploy, str(path), images, PostprocessConfig(), rtol=1e-3, atol=1e-5)
    assert report["verdict"] == "pass"
    assert {(c["session"], c["batch"]) for c in report["checks"]} == {
        ("ort_disable_all", 1), ("ort_disable_all", 3), ("ort_enable_all", 1), ("ort_enable_all", 3)}
    assert all(c["outputs"]["scores"]["max_abs"] < 1e-5 for c in report["checks"])


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
