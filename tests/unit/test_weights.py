"""Foreign weight files (run/weights.py): safe reading, payload forms, key mapping, the
load report, and freezing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from detpact.config import ModelConfig, OptimizerConfig
from detpact.engine.optim import build_optimizer
from detpact.engine.recalibrate import batchnorm_layers
from detpact.errors import DetpactError
from detpact.models.detector import build_model
from detpact.run.weights import (
    apply_freeze,
    apply_initial_weights,
    load_matching,
    read_weight_file,
    strip_prefixes,
)

TINY = {"backbone": {"args": {"width_mult": 0.0625, "depth_mult": 0.33}}}


def tiny_model(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig.model_validate(TINY), num_classes)


def model_cfg(**fields) -> ModelConfig:
    return ModelConfig.model_validate({**TINY, **fields})


def small_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(seed + 7)
    return net


def assert_same_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    assert [k for k in state if not torch.equal(state[k], expected[k])] == []


class Opaque:
    """A custom class: a file holding one needs full unpickling."""

    def __init__(self):
        self.weights = torch.ones(2)


# ---------------------------------------------------------------- reading and payloads


def test_raw_state_dict_round_trip_into_the_detector(tmp_path):
    source = tiny_model(seed=1)
    torch.save(source.state_dict(), tmp_path / "raw.pt")
    target = tiny_model(seed=2)
    assert not torch.equal(target.head.cls_branches[0][2].weight, source.head.cls_branches[0][2].weight)
    reports = apply_initial_weights(target, model_cfg(init_from=str(tmp_path / "raw.pt")))
    assert_same_state(target, source.state_dict())
    report = reports["init_from"]
    assert reports["backbone_weights"] is None
    assert report["counts"] == {"matched": len(source.state_dict()), "missing": 0, "unexpected": 0,
                                "shape_mismatched": 0}
    assert report["file"] == str(tmp_path / "raw.pt") and len(report["sha256"]) == 64
    json.dumps(report)  # plain values


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}},
    lambda sd: {"model_state_dict": sd},
    lambda sd: {"ema": sd},
    lambda sd: {"ema": {"module": sd, "updates": 12}},
    lambda sd: {"ema_model": sd},
    lambda sd: {"teacher": sd},
    lambda sd: {"module": sd},
    lambda sd: {**sd, "epoch": 5, "note": "non-tensor entries are dropped"},
], ids=["model", "state_dict", "model_state_dict", "ema", "ema_module", "ema_model", "teacher", "module", "mixed"])
def test_payload_forms(tmp_path, wrap):
    source = small_net(1)
    torch.save(wrap(source.state_dict()), tmp_path / "w.pt")
    state = read_weight_file(tmp_path / "w.pt")
    assert set(state) == set(source.state_dict())
    target = small_net(2)
    report = load_matching(target, state, "net")
    assert_same_state(target, source.state_dict())
    assert len(report.matched) == len(source.state_dict()) and not report.unexpected and not report.missing


def test_ema_weights_are_preferred_over_the_raw_ones(tmp_path):
    raw, ema = small_net(1), small_net(2)
    torch.save({"model": raw.state_dict(), "ema": {"module": ema.state_dict(), "updates": 4}}, tmp_path / "w.pt")
    target = small_net(3)
    load_matching(target, read_weight_file(tmp_path / "w.pt"), "net")
    assert_same_state(target, ema.state_dict())


@pytest.mark.parametrize("with_ema", [True, False])
def test_detpact_bundle(tmp_path, with_ema):
    raw, ema = small_net(1), small_net(2)
    bundle = {"format_version": 1, "model": raw.state_dict(), "optimizer": {}, "progress": {"global_step": 3},
              "ema": {"module": ema.state_dict(), "updates": 3} if with_ema else None}
    torch.save(bundle, tmp_path / "last.pt")
    target = small_net(3)
    load_matching(target, read_weight_file(tmp_path / "last.pt"), "net")
    assert_same_state(target, (ema if with_ema else raw).state_dict())


def test_safetensors_round_trip(tmp_path):
    source = small_net(1)
    save_file({f"model.{k}": v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    target = small_net(2)
    state = strip_prefixes(read_weight_file(tmp_path / "w.safetensors"), target.state_dict())
    load_matching(target, state, "net")
    assert_same_state(target, source.state_dict())


@pytest.mark.parametrize("payload", [lambda: {"model": nn.Linear(2, 2)}, lambda: {"state_dict": Opaque()}],
                         ids=["module", "custom_class"])
def test_a_file_that_needs_full_unpickling_is_refused(tmp_path, payload):
    path = tmp_path / "pickled.pt"
    torch.save(payload(), path)
    with pytest.raises(DetpactError) as err:
        read_weight_file(path)
    message = err.value.message
    assert str(path) in message and "refused" in message
    # ... and says how to convert it.
    assert "state_dict()" in message and "torch.save(sd" in message and ".safetensors" in message


def test_missing_and_non_weight_files(tmp_path):
    with pytest.raises(DetpactError, match="not found: .*nope.pt"):
        read_weight_file(tmp_path / "nope.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DetpactError, match="notes.txt is not a weights file"):
        read_weight_file(tmp_path / "notes.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00")
    with pytest.raises(DetpactError, match="bad.safetensors is not a readable"):
        read_weight_file(tmp_path / "bad.safetensors")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "empty.pt")
    with pytest.raises(DetpactError, match="holds no tensors"):
        read_weight_file(tmp_path / "empty.pt")


# ---------------------------------------------------------------- matching and the report


def test_no_matching_key_is_an_error(tmp_path):
    torch.save({"encoder.layer.0.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DetpactError) as err:
        apply_initial_weights(tiny_model(), model_cfg(init_from=str(tmp_path / "other.pt")))
    message = err.value.message
    assert message.startswith("model.init_from:") and "other.pt" in message
    assert "encoder.layer.0.weight" in message and "backbone." in message  # both key sets shown


def test_another_class_count_keeps_the_head_tensors_at_their_init(tmp_path, caplog):
    source = tiny_model(num_classes=3, seed=1)
    torch.save(source.state_dict(), tmp_path / "three.pt")
    target = tiny_model(num_classes=5, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level("INFO", logger="detpact.run.weights"):
        report = apply_initial_weights(target, model_cfg(init_from=str(tmp_path / "three.pt")))["init_from"]
    mismatched = {m["key"]: (m["file_shape"], m["model_shape"]) for m in report["shape_mismatched"]}
    assert mismatched and all(key.startswith("head.cls_branches.") for key in mismatched)
    assert mismatched["head.cls_branches.0.2.weight"][0][0] == 3 and mismatched["head.cls_branches.0.2.weight"][1][0] == 5
    state = target.state_dict()
    for key in state:
        expected = before[key] if key in mismatched else source.state_dict()[key]
        assert torch.equal(state[key], expected), key
    assert f"head: {len(mismatched)} tensors with another shape (head.cls_branches." in caplog.text
    assert "keep their initial values" in caplog.text


def test_prefixes_are_stripped_only_when_they_help():
    target = small_net(0).state_dict()
    ddp = {f"module.{k}": v for k, v in target.items()}
    assert set(strip_prefixes(ddp, target)) == set(target)
    nested = {f"module.backbone.{k}": v for k, v in target.items()}
    assert set(strip_prefixes(nested, target)) == set(target)
    # A prefix that is part of the model's own keys stays.
    own = {f"model.{k}": v for k, v in target.items()}
    assert set(strip_prefixes(own, own)) == set(own)


def test_backbone_weights_with_a_prefix_and_a_classifier(tmp_path):
    source = tiny_model(seed=1).backbone
    file_state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    file_state |= {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}
    torch.save(file_state, tmp_path / "backbone.pth")
    target = tiny_model(seed=2)
    head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
    reports = apply_initial_weights(target, model_cfg(backbone={**TINY["backbone"],
                                                                "weights": str(tmp_path / "backbone.pth")}))
    report = reports["backbone_weights"]
    assert reports["init_from"] is None and report["into"] == "backbone"
    assert sorted(report["unexpected"]) == ["fc.bias", "fc.weight"] and report["missing"] == []
    assert_same_state(target.backbone, source.state_dict())
    assert_same_state(target.head, head_before)


def test_backbone_weights_win_over_init_from(tmp_path):
    whole, backbone = tiny_model(seed=1), tiny_model(seed=2).backbone
    torch.save(whole.state_dict(), tmp_path / "whole.pt")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, tmp_path / "bb.safetensors")
    target = tiny_model(seed=3)
    apply_initial_weights(target, model_cfg(init_from=str(tmp_path / "whole.pt"),
                                            backbone={**TINY["backbone"], "weights": str(tmp_path / "bb.safetensors")}))
    assert_same_state(target.backbone, backbone.state_dict())
    assert_same_state(target.head, whole.head.state_dict())


# ---------------------------------------------------------------- freezing


def test_freeze_parts_and_counts():
    model = tiny_model()
    summary = apply_freeze(model, model_cfg(freeze=["backbone", "neck"]))
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(("backbone.", "neck."))), name
    frozen = sum(p.numel() for p in model.backbone.parameters()) + sum(p.numel() for p in model.neck.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert summary == {"frozen_parts": ["backbone", "neck"], "frozen_params": frozen,
                       "trainable_params": total - frozen, "freeze_bn": False, "frozen_bn_layers": 0}
    optimizer = build_optimizer(model, OptimizerConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_freezing_everything_is_an_error():
    with pytest.raises(DetpactError, match="no parameter to train"):
        apply_freeze(tiny_model(), model_cfg(freeze=["backbone", "neck", "projector", "head"]))


def test_freeze_bn_keeps_the_statistics_in_train_mode():
    model = tiny_model()
    keys = list(model.state_dict())
    summary = apply_freeze(model, model_cfg(freeze_bn=True))
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert summary["frozen_bn_layers"] == len(layers) > 0 and summary["frozen_params"] == 0
    assert list(model.state_dict()) == keys  # same state-dict keys
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    images = torch.rand(2, 3, 64, 64)
    model.train()
    assert not any(layer.training for layer in layers)
    out = model(images)
    (out.cls_logits.sum() + out.boxes.sum()).backward()
    assert all(layer.weight.grad is not None for layer in layers)  # the affine weights still train
    model.eval()
    model.train()  # as the loop does around validation
    assert not any(layer.training for layer in layers)
    model(images)
    after = model.state_dict()
    assert [k for k in buffers if not torch.equal(buffers[k], after[k])] == []
    # The EMA's copy keeps the behaviour, and BatchNorm recalibration leaves the layers alone.
    ema = copy.deepcopy(model)
    ema.train()
    assert not any(m.training for m in ema.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert batchnorm_layers(model) == [] and batchnorm_layers(ema) == []
    # Train mode computes what eval mode computes: the running statistics, not the batch's.
    plain = tiny_model()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.train()(images).cls_logits, plain.eval()(images).cls_logits)


def _safetensors_bytes(header: dict, data: bytes, declared: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return (len(body) if declared is None else declared).to_bytes(8, "little") + body + data


@pytest.mark.parametrize("content", [
    (10**6).to_bytes(8, "little") + b"{}{}",  # the header length runs past the end of the file
    (200 << 20).to_bytes(8, "little") + b"{}",  # a 200 MiB header
    _safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),  # past the data
    _safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # overlapping
], ids=["length", "huge_header", "offsets", "overlap"])
def test_a_malformed_safetensors_file_is_refused_with_its_name(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(DetpactError) as caught:
        read_weight_file(path)
    assert str(path) in caught.value.message and "is not a readable .safetensors file" in caught.value.message


def test_an_old_torch_is_refused_by_the_pickle_loaders_but_safetensors_still_load(tmp_path, monkeypatch):
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    with pytest.raises(DetpactError, match="CVE-2026-24747"):
        read_weight_file(tmp_path / "w.pt")
    assert torch.equal(read_weight_file(tmp_path / "w.safetensors")["w"], state["w"])
