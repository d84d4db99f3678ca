"""train.quant (models/quant.py): int8 weight-only quantisation with torchao on the
Linear layers, frozen; int4wo refused or skipped off CUDA; plain checkpoints that
re-quantise to the same bits; a quantised run that trains, resumes and evaluates."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import pytest
import torch
from torch import nn

from conftest import run_cli, train_tiny_run
from detpact.api import evaluate
from detpact.config.model import ModelConfig
from detpact.errors import DetpactError
from detpact.models.detector import build_model, count_parameters
from detpact.models.quant import INSTALL_HINT, QuantisedLinear, apply_quant, dequantise_for_inference

pytest.importorskip("torchao", reason="train.quant needs the adapt extra")

CPU = torch.device("cpu")
TINY_RTDETR = {"backbone": {"args": {"width_mult": 0.0625, "depth_mult": 0.33}}, "projector": {"d_model": 32},
               "head": {"name": "rtdetr", "rtdetr": {"num_queries": 20, "num_decoder_layers": 2, "num_heads": 2,
                                                     "dim_feedforward": 64, "encoder_ffn": 64, "num_denoising": 12}}}
RTDETR_SETS = ["--set", "model.head.name=rtdetr", "--set", "model.projector.d_model=32",
               "--set", "model.head.rtdetr={num_queries: 20, num_decoder_layers: 2, num_heads: 2, dim_feedforward: 64, "
                        "encoder_ffn: 64, num_denoising: 12}"]


def rtdetr(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig.model_validate(TINY_RTDETR), 5).eval()


def boxes_and_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(images)
    return torch.cat([out.cls_logits.flatten(), out.boxes.flatten()])


def test_int8wo_takes_every_linear_but_attention_out_projections_and_freezes_them():
    model = rtdetr()
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    attention_out = {f"{name}.out_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    float_keys = model.state_dict().keys()
    params_before = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == params_before
    record = apply_quant(model, "int8wo", required=True, device=CPU)

    quantised = {name for name, m in model.named_modules() if isinstance(m, QuantisedLinear)}
    assert attention_out and quantised == linears - attention_out
    assert record["applied"] == "int8wo" and record["layers"] == len(quantised) and record["reason"] is None
    assert record["quantised_params"] == params_before - sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == params_before  # the run's parameter count still counts them
    assert not any(type(m) is nn.Linear for name, m in model.named_modules() if name not in attention_out)
    assert all(isinstance(m.qweight, torch.Tensor) and not m.qweight.requires_grad for m in model.modules()
               if isinstance(m, QuantisedLinear))
    assert model.state_dict().keys() == float_keys  # a quantised run's checkpoint loads into the float model


def test_the_dense_detector_has_no_linear_layer_and_says_so():
    model = build_model(ModelConfig(), 5)
    record = apply_quant(model, "int8wo", required=False, device=CPU)
    assert record["applied"] == "none" and "no Linear layer" in record["reason"]
    with pytest.raises(DetpactError, match="no Linear layer.*quant_required"):
        apply_quant(model, "int8wo", required=True, device=CPU)


def test_training_moves_the_float_parts_never_the_quantised_weights():
    model = rtdetr().train()
    apply_quant(model, "int8wo", required=True, device=CPU)
    layer = next(m for m in model.modules() if isinstance(m, QuantisedLinear))
    qdata, bias = layer.qweight.qdata.clone(), layer.bias.detach().clone()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight
    conv_before = conv.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the tiny runs train
        out = model(torch.rand(2, 3, 64, 64))
    (out.cls_logits.float().sum() + out.boxes.float().sum()).backward()
    optimizer.step()
    assert torch.equal(layer.qweight.qdata, qdata)
    assert not torch.equal(layer.bias, bias) and not torch.equal(conv, conv_before)


def test_checkpoints_hold_the_float_base_and_requantise_to_the_same_bits():
    model = rtdetr()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_quant(model, "int8wo", required=True, device=CPU)
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values())  # plain tensors: weights-only loadable
    assert all(torch.equal(state[k], base[k]) for k in base)  # the float base, not the dequantised weight
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    resumed = rtdetr(seed=1)  # other initial weights, replaced by the checkpoint's
    apply_quant(resumed, "int8wo", required=True, device=CPU)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    pairs = [(a, b) for a, b in zip(model.modules(), resumed.modules()) if isinstance(a, QuantisedLinear)]
    assert pairs and all(torch.equal(a.qweight.qdata, b.qweight.qdata) and torch.equal(a.qweight.scale, b.qweight.scale)
                         for a, b in pairs)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(boxes_and_logits(model, images), boxes_and_logits(resumed, images))

    # Inference: the float model with the quantised weights' float values computes what the quantised one does.
    inference = rtdetr(seed=2)
    inference.load_state_dict(state)
    assert dequantise_for_inference(inference, {"applied": "int8wo"}) == len(pairs)
    plain = rtdetr(seed=2)
    plain.load_state_dict(state)
    quantised_out, inference_out = boxes_and_logits(model, images), boxes_and_logits(inference, images)
    assert torch.allclose(inference_out, quantised_out, atol=1e-4, rtol=1e-4)
    assert (boxes_and_logits(plain, images) - quantised_out).abs().max() > 10 * (inference_out - quantised_out).abs().max()


def test_int4wo_on_cpu_is_refused_when_required_and_otherwise_skipped_and_recorded(caplog):
    model = rtdetr()
    before = boxes_and_logits(model, torch.zeros(1, 3, 64, 64))
    with pytest.raises(DetpactError, match="int4wo needs a CUDA device.*quant_required is set"):
        apply_quant(model, "int4wo", required=True, device=CPU)
    with caplog.at_level(logging.WARNING, logger="detpact.models.quant"):
        record = apply_quant(model, "int4wo", required=False, device=CPU)
    assert record["requested"] == "int4wo" and record["applied"] == "none" and "CUDA" in record["reason"]
    assert "training without quantisation" in caplog.text and "CUDA" in caplog.text
    assert not any(isinstance(m, QuantisedLinear) for m in model.modules())
    assert torch.equal(boxes_and_logits(model, torch.zeros(1, 3, 64, 64)), before)


def test_a_missing_torchao_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(DetpactError, match=f"needs torchao.*{re.escape(INSTALL_HINT)}"):
        apply_quant(rtdetr(), "int8wo", required=False, device=CPU)


@pytest.fixture(scope="module")
def quantised_run(tmp_path_factory, cache_dir):
    """The module's one training run: the tiny config with a small rtdetr head, int8wo, one epoch (3 steps)."""
    root = tmp_path_factory.mktemp("quant")
    return train_tiny_run(root, cache_dir, *RTDETR_SETS, "--set", "train.quant=int8wo", "--set", "train.epochs=1")


def test_an_int8wo_run_trains_records_and_evaluates(quantised_run):
    env, run, _ = quantised_run
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["weights"]["quant"]["applied"] == "int8wo" and report["weights"]["quant"]["layers"] > 0
    assert report["best"]["step"] == 3 and report["final_val"]["map50_95"] is not None
    # The float model with the quantised weights' values scores what the int8 model scored in training.
    evaluated = evaluate(run, environ=env)  # in-process: torchao is imported once
    assert evaluated["num_images"] == 6 and evaluated["num_dets"] > 0
    for key in ("map50_95", "map50", "ar_max"):
        assert evaluated[key] == pytest.approx(report["final_val"][key], abs=1e-6), key


def test_qlora_on_cpu_is_refused_when_required_and_otherwise_trains_the_adapters_over_the_float_base(quantised_run):
    env, run, _ = quantised_run
    root, config = run.parent.parent, run.parent.parent / "tiny.yaml"
    qlora = [*RTDETR_SETS, "--set", "train.qlora=true", "--set", "train.lora={r: 4, target: all_linear}"]
    refused = run_cli(["train", str(config), "--run-id", "qlora_required", *qlora,
                       "--set", "train.quant_required=true"], env, root)
    assert refused.returncode == 2 and "int4wo needs a CUDA device" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (root / "runs" / "qlora_required" / "checkpoints" / "last.pt").exists()
    skipped = run_cli(["train", str(config), "--run-id", "qlora", *qlora, "--set", "train.max_steps=1"], env, root)
    assert skipped.returncode == 0, skipped.stderr
    assert "training without quantisation" in skipped.stderr
    weights = json.loads((root / "runs" / "qlora" / "reports" / "train_report.json").read_text())["weights"]
    assert weights["quant"]["requested"] == "int4wo" and weights["quant"]["applied"] == "none"
    assert "CUDA" in weights["quant"]["reason"]
    assert weights["lora"]["adapted_layers"] > 0
    assert weights["lora"]["trainable_params"] == weights["lora"]["adapter_params"]
