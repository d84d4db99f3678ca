"""LoRA adapters (models/lora.py): which layers each target adapts, what trains, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import batches
from torch import nn

from detpact.config import EMAConfig, ModelConfig, OptimizerConfig, PostprocessConfig
from detpact.config.train import LoRAConfig
from detpact.engine.ema import ModelEMA
from detpact.engine.guards import NonFiniteGuard
from detpact.engine.optim import build_optimizer
from detpact.engine.step import StepParts, train_step
from detpact.errors import DetpactError
from detpact.export.onnx import DeployModel, export_onnx
from detpact.export.parity import check_parity
from detpact.models.detector import build_model
from detpact.models.lora import LoRALayer, apply_lora, merge_lora, merged_copy
from detpact.models.losses import build_criterion

TINY = {"backbone": {"args": {"width_mult": 0.0625, "depth_mult": 0.33}}}
RTDETR = {**TINY, "projector": {"d_model": 32}, "head": {"name": "rtdetr", "rtdetr": {
    "num_queries": 20, "num_decoder_layers": 2, "num_heads": 2, "dim_feedforward": 64, "encoder_ffn": 64,
    "num_denoising": 12}}}


def model_of(spec: dict, seed: int = 0) -> tuple[ModelConfig, nn.Module]:
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate(spec)
    return cfg, build_model(cfg, 3)


def expected_layers(model: nn.Module, target: str) -> set[str]:
    """Written out independently of target_layers: the layers each target names."""
    names = set()
    for name, module in model.named_modules():
        in_attention = name.endswith("self_attn.out_proj") or name.endswith("cross_attn.out_proj")
        is_linear = type(module) is nn.Linear or (isinstance(module, nn.Linear) and not in_attention)
        is_conv1x1 = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        wanted = {"head": (is_linear or is_conv1x1) and name.startswith("head."), "all_linear": is_linear,
                  "all_conv1x1": is_conv1x1, "all_linear_conv1x1": is_linear or is_conv1x1}[target]
        if wanted:
            names.add(name)
    return names


@pytest.mark.parametrize("spec", [TINY, RTDETR], ids=["dense", "rtdetr"])
@pytest.mark.parametrize("target", ["head", "all_linear", "all_conv1x1", "all_linear_conv1x1"])
def test_each_target_adapts_exactly_the_layers_it_names(spec, target):
    _, model = model_of(spec)
    expected = expected_layers(model, target)
    types_before = {name: type(module) for name, module in model.named_modules()}
    if not expected:  # the dense detector has no Linear layer
        with pytest.raises(DetpactError, match="finds no layer to adapt"):
            apply_lora(model, LoRAConfig(r=2, target=target))
        return
    report = apply_lora(model, LoRAConfig(r=2, target=target))
    adapted = {name for name, module in model.named_modules() if isinstance(module, LoRALayer)}
    assert adapted == expected == set(report["layers"])
    # Every other layer is untouched; the adapted ones are LoRALayers in place of their base.
    for name, kind in types_before.items():
        if name in expected:
            continue
        if not any(name.startswith(f"{layer}.") for layer in expected):
            assert type(model.get_submodule(name)) is kind, name
    assert report["adapter_params"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def test_rtdetr_attention_projections_are_left_out():
    _, model = model_of(RTDETR)
    apply_lora(model, LoRAConfig(r=2, target="all_linear"))
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            assert type(module.out_proj) is not LoRALayer, name


def lora_parts(lora: LoRAConfig) -> StepParts:
    _, model = model_of(TINY)
    apply_lora(model, lora)
    model.train()
    return StepParts(model=model, criterion=build_criterion(ModelConfig.model_validate(TINY).head),
                     optimizer=build_optimizer(model, OptimizerConfig(lr=1e-2)), ema=ModelEMA(model, EMAConfig(), 100),
                     scaler=None, guard=NonFiniteGuard(3, "last.pt"), device=torch.device("cpu"), amp="none",
                     channels_last=False, grad_clip=10.0, accumulate=1)


@pytest.mark.parametrize("train_bias", ["none", "all"])
def test_only_adapters_and_chosen_biases_change_in_training(train_bias):
    parts = lora_parts(LoRAConfig(r=4, target="all_conv1x1", train_bias=train_bias))
    before = {name: p.detach().clone() for name, p in parts.model.named_parameters()}
    data = batches(2)
    for step in (1, 2):
        assert train_step(parts, data, lr=1e-2, step=step) is not None
    trained, moved = [], []
    for name, param in parts.model.named_parameters():
        leaf = name.rpartition(".")[2]
        changed = not torch.equal(before[name], param.detach())
        if leaf in ("lora_a", "lora_b") or (train_bias == "all" and leaf.endswith("bias")):
            trained.append(name)
            moved += [name] if changed else []
        else:
            assert not changed, f"{name} is not an adapter{' or a bias' if train_bias == 'all' else ''} but changed"
    # Most trained ones moved (a branch without a matched box this step gets no gradient).
    assert len(moved) >= 0.8 * len(trained), sorted(set(trained) - set(moved))
    if train_bias == "all":
        assert any(name.endswith(".bias") for name in moved)
    # The EMA of a frozen weight stays that weight, bit for bit.
    ema = dict(parts.ema.module.named_parameters())
    frozen = [n for n, p in parts.model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(ema[n], before[n]) for n in frozen)


def test_without_freeze_base_everything_trains():
    parts = lora_parts(LoRAConfig(r=4, target="head", freeze_base=False))
    assert all(p.requires_grad for p in parts.model.parameters())


def calibrate_batchnorm(model: nn.Module) -> None:
    """Eval statistics from one batch (as test_zoo_pairs does): an untrained model's would
    squash every signal, and merged == unmerged would hold trivially."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 64, 64))


def randomise_adapters(model: nn.Module) -> None:
    """B starts at zero (the adapted model equals its base): give it values, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 0.02)


@pytest.mark.parametrize(("spec", "target"), [(TINY, "all_conv1x1"), (TINY, "head"),
                                              (RTDETR, "all_linear_conv1x1")], ids=["dense", "dense-head", "rtdetr"])
def test_merged_outputs_equal_unmerged_ones(spec, target):
    _, model = model_of(spec)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target=target))
    randomise_adapters(model)
    calibrate_batchnorm(model)
    model.eval()
    # Each merged layer computes what its adapted layer does, within 1e-5 (float32).
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALayer):
                shape = (2, layer.weight.shape[1], 8, 8) if layer.conv else (2, 5, layer.weight.shape[1])
                x = torch.randn(shape, generator=generator)
                assert (layer.merged()(x) - layer(x)).abs().max() < 1e-5, name
    # The whole detector: float32 rounding differs between W x + s B A x and (W + s B A) x and
    # grows through the layers; within the export parity gate's rtol (1e-3) with atol 1e-4.
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        adapted = model(images)
        merged = merged_copy(model)
        assert merged is not model and not any(isinstance(m, LoRALayer) for m in merged.modules())
        after = merged(images)
        torch.testing.assert_close(after.cls_logits, adapted.cls_logits, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(after.boxes, adapted.boxes, rtol=1e-3, atol=1e-4)
        # The adapters moved the output: the comparison is not between two base models.
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.lora_b.zero_()
        assert (model(images).cls_logits - after.cls_logits).abs().max() > 1e-3


def test_merged_onnx_export_passes_parity_against_the_adapted_model(tmp_path):
    _, model = model_of(TINY)
    apply_lora(model, LoRAConfig(r=4, target="all_conv1x1"))
    randomise_adapters(model)
    calibrate_batchnorm(model)
    adapted = DeployModel(model).eval()
    path = tmp_path / "model.onnx"
    export_onnx(DeployModel(merged_copy(model)), path, image_size=64, opset=18, exporter="torchscript")
    pixels = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    report = check_parity(adapted, str(path), pixels, PostprocessConfig(), rtol=1e-3, atol=1e-5)
    assert report["verdict"] == "pass", report["checks"][0]


def test_merge_lora_in_place_returns_the_count():
    _, model = model_of(TINY)
    report = apply_lora(model, LoRAConfig(r=2, target="head"))
    assert merge_lora(model) == report["adapted_layers"] == 6
    assert merge_lora(model) == 0
