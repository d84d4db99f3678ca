"""The backbone zoo: the (P3, P4, P5) contract of every family, the norms, and torchvision's
weight layout (module names, shapes and values survive a strict load)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from detpact.config import BackboneConfig, ModelConfig, validate_config
from detpact.models.backbones import BACKBONES, build_backbone
from detpact.models.backbones.convnext import ConvNeXt
from detpact.models.backbones.norms import FrozenBatchNorm2d, group_count, make_norm, replace_batchnorm
from detpact.models.detector import build_model
from detpact.run.weights import apply_initial_weights

# torchvision's state-dict layouts (keys, shapes, dtypes; PROVENANCE.md there), next to the
# checkout (../shared/fixtures/weights) or at the workspace's fixed path.
FIXTURES = next((p for p in (Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "weights",
                             Path("/work/shared/fixtures/weights")) if p.is_dir()), Path("/work/shared/fixtures/weights"))
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no weight-layout fixtures at {FIXTURES}")
# (name, args): every family, cspdarknet at two sizes.
BUILDS = {
    "tiny_cnn": ("tiny_cnn", {}),
    "cspdarknet_n": ("cspdarknet", {"size": "n"}),
    "cspdarknet_s": ("cspdarknet", {"size": "s"}),
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", {}),
    "resnet50": ("resnet50", {}),
    "convnext_tiny": ("convnext_tiny", {}),
    "cspresnet": ("cspresnet", {}),
}
SIZES = [(64, 64), (64, 96), (96, 96)]


def build(name: str, args: dict | None = None, norm: str = "bn") -> nn.Module:
    return build_backbone(BackboneConfig(name=name, args=args or {}, norm=norm))


def test_every_family_is_covered():
    assert {name for name, _ in BUILDS.values()} == set(BACKBONES)


@pytest.mark.parametrize("key", BUILDS)
def test_maps_have_out_channels_and_strides(key):
    torch.manual_seed(0)
    model = build(*BUILDS[key])
    assert model.strides == (8, 16, 32) and len(model.out_channels) == 3
    model.eval()
    with torch.no_grad():
        for h, w in SIZES:
            maps = model(torch.rand(1, 3, h, w))
            assert [tuple(m.shape) for m in maps] == [(1, c, h // s, w // s) for c, s in zip(model.out_channels, model.strides)]
    # Train mode (batch statistics, batch of 2): every parameter receives a finite gradient.
    model.train()
    maps = model(torch.rand(2, 3, 64, 96))
    sum(m.float().mean() for m in maps).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", ["tiny_cnn", "cspdarknet", "resnet18", "cspresnet"])
@pytest.mark.parametrize("norm", ["gn", "frozen_bn"])
def test_norm_kinds_replace_every_batchnorm(name, norm):
    torch.manual_seed(0)
    model = build(name, norm=norm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    kind = nn.GroupNorm if norm == "gn" else FrozenBatchNorm2d
    assert sum(isinstance(m, kind) for m in model.modules()) > 0
    x = torch.rand(2, 3, 64, 96)
    maps = model.train()(x)
    assert [m.shape[1] for m in maps] == list(model.out_channels)
    sum(m.mean() for m in maps).backward()
    if norm == "frozen_bn":
        frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert all(not list(m.parameters()) for m in frozen)
        # Only the convolutions (and cspresnet's SE projection) train.
        assert {type(m) for m in model.modules() if list(m.parameters(recurse=False))} == {nn.Conv2d}
        with torch.no_grad():
            train_out = model.train()(x)
            eval_out = model.eval()(x)
        assert all(torch.equal(a, b) for a, b in zip(train_out, eval_out))
        assert all(m.num_batches_tracked.item() == 0 and torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
                   for m in frozen)


def test_default_norm_is_the_warm_start_batchnorm():
    from detpact.models.layers import WarmStartBatchNorm2d

    for name in ("tiny_cnn", "resnet18", "cspresnet"):
        norms = [m for m in build(name).modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(isinstance(m, WarmStartBatchNorm2d) for m in norms)


def test_frozen_batchnorm_equals_batchnorm_in_eval_and_keeps_its_keys():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(24, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.num_batches_tracked.fill_(7)
    x = torch.randn(2, 24, 5, 6)
    frozen = replace_batchnorm(nn.Sequential(bn), "frozen_bn")[0]
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == 1e-3
    torch.testing.assert_close(frozen(x), bn.eval()(x), atol=1e-5, rtol=1e-5)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in bn.state_dict().items())
    fresh = FrozenBatchNorm2d(24)
    fresh.load_state_dict(bn.state_dict())  # strict: a BatchNorm2d's file loads as is


def test_group_norm_groups():
    assert [group_count(c) for c in (64, 72, 8, 20, 100)] == [32, 24, 8, 20, 25]
    assert make_norm("gn", 72).num_groups == 24
    with pytest.raises(ValueError, match="bn, gn, frozen_bn"):
        make_norm("ln", 8)


def random_state_dict(fixture: Path) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the keys, shapes and dtypes the fixture lists."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, spec in json.loads(fixture.read_text())["tensors"].items():
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            out[key] = torch.randn(spec["shape"], generator=gen).to(dtype)
        else:
            out[key] = torch.randint(1, 1000, spec["shape"], generator=gen).to(dtype)
    return out


@needs_fixtures
@pytest.mark.parametrize("name,norm", [("resnet18", "bn"), ("resnet34", "bn"), ("resnet50", "bn"),
                                       ("resnet50", "frozen_bn"), ("resnet18", "frozen_bn"), ("convnext_tiny", "bn")])
def test_torchvision_weights_load_strictly(name, norm):
    weights = random_state_dict(FIXTURES / f"torchvision_{name}.json")
    classifier = {k for k in weights if k.startswith(("fc.", "classifier."))}
    assert classifier  # the fixture is a full torchvision model
    model = build(name, norm=norm)
    result = model.load_state_dict({k: v for k, v in weights.items() if k not in classifier}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = model.state_dict()
    assert set(weights) - set(ours) == classifier and not set(ours) - set(weights)
    for key, value in ours.items():
        assert value.dtype == weights[key].dtype and torch.equal(value, weights[key]), key


@needs_fixtures
def test_param_counts_match_torchvision_without_classifier():
    def count(name):
        return sum(p.numel() for p in build(name).parameters())

    for name in ("resnet18", "resnet34", "resnet50", "convnext_tiny"):
        fixture = json.loads((FIXTURES / f"torchvision_{name}.json").read_text())
        classifier = sum(int(np.prod(s["shape"])) for k, s in fixture["tensors"].items() if k.startswith(("fc.", "classifier.")))
        assert count(name) == fixture["num_params"] - classifier, name
    assert count("resnet50") == 23_508_032


def test_convnext_drop_path_is_seeded_and_off_in_eval():
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), drop_path=0.5)
    rates = [block.drop_path for i in (1, 3, 5, 7) for block in model.features[i]]
    assert rates == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    for block in model.modules():  # a visible residual branch, so that dropping it shows
        if hasattr(block, "layer_scale"):
            block.layer_scale.data.fill_(1.0)
    x = torch.rand(4, 3, 64, 64)

    def run(seed):
        torch.manual_seed(seed)
        return model.train()(x)

    assert all(torch.equal(a, b) for a, b in zip(run(1), run(1)))
    assert not all(torch.equal(a, b) for a, b in zip(run(1), run(2)))
    plain = ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), drop_path=0.0)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), plain.eval()(x)))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError) as info:
        build_backbone(BackboneConfig.model_construct(name="vgg16", norm="bn", args={}))
    assert all(name in str(info.value) for name in BACKBONES)


def test_cspdarknet_s_alias_builds_the_s_network():
    raw = {"config_version": 1, "data": {"format": "synthetic"}, "model": {"backbone": {"name": "cspdarknet_s"}}}
    cfg = validate_config(raw).model.backbone
    assert cfg.name == "cspdarknet" and cfg.args["size"] == "s"
    assert build_backbone(cfg).out_channels == (128, 256, 512)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the exporter's own deprecation notices
@pytest.mark.parametrize("name,norm", [("tiny_cnn", "bn"), ("resnet18", "frozen_bn")])
def test_onnx_export_matches_torch(name, norm, tmp_path):
    torch.manual_seed(0)
    model = build(name, norm=norm).eval()
    x = torch.rand(1, 3, 64, 64)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, verbose=False,
                      input_names=["images"], output_names=["p3", "p4", "p5"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    for ours, theirs in zip(expected, exported):
        assert ours.shape == theirs.shape
        assert np.abs(ours.numpy() - theirs).max() < 1e-4


@needs_fixtures
@pytest.mark.parametrize("name,suffix", [("resnet18", ".pth"), ("convnext_tiny", ".safetensors")])
def test_a_torchvision_file_loads_through_model_backbone_weights(name, suffix, tmp_path):
    """The user's path: a whole torchvision file (classifier included) named by
    model.backbone.weights loads every backbone tensor, by value, and reports the rest."""
    weights = random_state_dict(FIXTURES / f"torchvision_{name}.json")
    path = tmp_path / f"{name}-torchvision{suffix}"
    if suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    cfg = ModelConfig.model_validate({"backbone": {"name": name, "weights": str(path)}, "head": {"name": "rtdetr"},
                                      "projector": {"d_model": 32}})
    model = build_model(cfg, num_classes=3)
    report = apply_initial_weights(model, cfg)["backbone_weights"]
    assert report["into"] == "backbone" and report["missing"] == [] and report["shape_mismatched"] == []
    assert report["counts"]["matched"] == len(model.backbone.state_dict())
    assert sorted(report["unexpected"]) == sorted(k for k in weights if k.startswith(("fc.", "classifier.")))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, weights[key]), key
