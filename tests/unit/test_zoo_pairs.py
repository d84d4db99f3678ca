"""Every backbone x head pair: declared output layout, a training step, and an ONNX export
that passes the parity gate (at small inputs, so the heavy backbones stay quick)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detpact.config import ModelConfig, PostprocessConfig
from detpact.config.model import BACKBONE_ARGS
from detpact.export.onnx import DeployModel, export_onnx
from detpact.export.parity import check_parity
from detpact.models.detector import build_model
from detpact.models.losses import build_criterion

SIZE = 64
# The legacy tracer exports the dense pairs in a fraction of the time; the rtdetr head
# needs the dynamo exporter (the tracer bakes the batch size into its attention).
EXPORTER = {"dense": "torchscript", "rtdetr": "dynamo"}
HEADS = {
    "dense": {"head": {"name": "dense", "reg_max": 4}},
    # A small rtdetr: 20 queries fit the 84 positions of a 64 px input.
    "rtdetr": {"projector": {"d_model": 32}, "head": {"name": "rtdetr", "rtdetr": {
        "num_queries": 20, "num_decoder_layers": 2, "num_heads": 2, "dim_feedforward": 64, "encoder_ffn": 64,
        "num_denoising": 12}}},
}
PAIRS = [(backbone, head) for backbone in BACKBONE_ARGS for head in HEADS]


def build(backbone: str, head: str, num_classes: int = 3):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"backbone": {"name": backbone}, **HEADS[head]})
    return cfg, build_model(cfg, num_classes)


def calibrate_batchnorm(model: torch.nn.Module) -> None:
    """An untrained model's eval statistics (mean 0, var 1) would squash every signal: set
    them from one batch, so the parity gate compares outputs that depend on the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(4, 3, SIZE, SIZE))


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "head"), PAIRS)
def test_pair_trains_and_exports_with_parity(backbone, head, tmp_path):
    cfg, model = build(backbone, head)
    images = torch.rand(2, 3, SIZE, SIZE + 32)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = model.train()(images, targets)
    candidates = 20 if head == "rtdetr" else sum((SIZE // s) * ((SIZE + 32) // s) for s in (8, 16, 32))
    assert out.cls_logits.shape == (2, candidates, 3) and out.boxes.shape == (2, candidates, 4)
    losses = build_criterion(cfg.head)(out, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained) > 0.9 * len(trained)

    calibrate_batchnorm(model)
    deploy = DeployModel(model).eval()
    path = tmp_path / "model.onnx"
    export_onnx(deploy, path, image_size=SIZE, opset=18, exporter=EXPORTER[head])
    pixels = np.random.default_rng(0).random((3, 3, SIZE, SIZE), dtype=np.float32)
    report = check_parity(deploy, str(path), pixels, PostprocessConfig(), rtol=1e-3, atol=1e-5)
    assert report["verdict"] == "pass", report["checks"][0]
