"""Every backbone x head pair: declared output layout, a training step, and an ONNX export
that passes the parity gate (at small inputs, so the heavy backbones stay quick)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detpact.config import ModelConfig, PostprocessConfig
from detpact.config.model import BACKBONE_ARGS
from detpact.export.nms_graph import RAW, append_postprocess
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


@pytest.mark.slow
@pytest.mark.parametrize(("head", "opset"), [("dense", 17), ("dense", 18), ("rtdetr", 18)])  # rtdetr: dynamo, >= 18
def test_postprocessing_in_the_graph_passes_parity_for_every_head(head, opset, tmp_path):
    """export --nms: the graph's detections equal models/postprocess.py's on the same raw
    outputs, at both ReduceX forms (axes attribute < 18, input >= 18), with more
    candidates than max_det, and with none above the threshold (an empty image)."""
    _, model = build("cspdarknet", head)
    calibrate_batchnorm(model)
    with torch.no_grad():  # an untrained model's scores saturate at 1.0: spread them, so few tie
        for name, param in model.named_parameters():
            last_dense = name.startswith("head.cls_branches") and name.endswith(".2.weight")
            if last_dense or ("score_head" in name and name.endswith("weight")):  # the logit layers
                param.mul_(0.05)
    deploy = DeployModel(model).eval()
    raw = tmp_path / "raw.onnx"
    export_onnx(deploy, raw, image_size=SIZE, opset=opset, exporter=EXPORTER[head])
    pixels = np.random.default_rng(1).random((3, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        middle = float(np.median(deploy(torch.from_numpy(pixels))[1].numpy()))
    for post in (PostprocessConfig(score_threshold=middle, max_det=10, pre_nms_topk=60),
                 PostprocessConfig(score_threshold=1.0)):
        graph = append_postprocess(onnx.load(str(raw)), post, nms=head == "dense")
        checked = onnx.ModelProto()
        checked.CopyFrom(graph)
        checked.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                    for name in RAW.values())
        report = check_parity(deploy, checked.SerializeToString(), pixels, post, rtol=1e-3, atol=1e-5, in_graph=True)
        assert report["verdict"] == "pass", [(c["outputs"], c["postnms"], c["in_graph"]) for c in report["checks"]]
        assert all(c["in_graph"]["pass"] and c["in_graph"]["tie_order_images"] == 0 for c in report["checks"]), [c["in_graph"] for c in report["checks"]]
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        boxes, scores, labels, counts = session.run(None, {"images": pixels})
        assert boxes.shape == (3, post.max_det, 4) and labels.dtype == np.int64
        if post.score_threshold == 1.0:
            assert counts.tolist() == [0, 0, 0] and (labels == -1).all() and not scores.any()
        else:
            assert counts.tolist() == [10, 10, 10]  # more candidates than max_det, cut to the best
            assert (np.diff(scores, axis=1) <= 0).all()  # best first
