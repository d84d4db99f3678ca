"""Config: schema errors name the key, overrides take priority, the hash is stable."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from detpact.config import config_hash, diff_configs, dump_config_yaml, load_config, resolved_dict, validate_config
from detpact.errors import DetpactError
from detpact.models.detector import build_model

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def base_config() -> dict:
    return {"config_version": 1, "data": {"format": "synthetic"}}


def test_quickstart_loads_and_defaults_fill_in():
    cfg = load_config(QUICKSTART)
    assert cfg.data.format == "synthetic"
    assert cfg.model.backbone.args["width_mult"] == 0.25
    assert cfg.train.optimizer.name == "adamw"  # a default the file does not set


@pytest.mark.parametrize(
    ("section", "typo", "suggestion"),
    [({"train": {"epochz": 3}}, "train.epochz", "epochs"),
     ({"model": {"backbone": {"args": {"widht_mult": 0.5}}}}, "model.backbone.args.widht_mult", "width_mult"),
     ({"trian": {"epochs": 3}}, "trian", "train")],
)
def test_unknown_key_named_with_valid_keys_and_suggestion(tmp_path, section, typo, suggestion):
    raw = {**base_config(), **section}
    with pytest.raises(DetpactError) as err:
        load_config(write(tmp_path, raw))
    message = err.value.message
    assert f"unknown key '{typo}'" in message
    assert f"Did you mean '{suggestion}'?" in message
    assert "Valid keys" in message and suggestion in message
    assert "cfg.yaml" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    raw = {**base_config(), "train": {"epochs": "ten"}}
    with pytest.raises(DetpactError) as err:
        load_config(write(tmp_path, raw))
    assert "'train.epochs'" in err.value.message and "'ten'" in err.value.message


def test_all_errors_reported_at_once(tmp_path):
    raw = {**base_config(), "train": {"epochs": "ten", "batch_size": -1}, "eval": {"bogus": 1}}
    with pytest.raises(DetpactError) as err:
        load_config(write(tmp_path, raw))
    for key in ("train.epochs", "train.batch_size", "eval.bogus"):
        assert key in err.value.message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(DetpactError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DetpactError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(DetpactError, match="must hold a YAML mapping"):
        load_config(scalar)


def test_config_version_required_and_checked(tmp_path):
    with pytest.raises(DetpactError, match="config_version' is required"):
        load_config(write(tmp_path, {"data": {"format": "synthetic"}}))
    with pytest.raises(DetpactError, match="unsupported config_version 2"):
        load_config(write(tmp_path, {**base_config(), "config_version": 2}))


def test_real_data_needs_a_path(tmp_path):
    with pytest.raises(DetpactError, match="data.path is required"):
        load_config(write(tmp_path, {"config_version": 1, "data": {"format": "yolo"}}))


def test_override_precedence_cli_over_file_over_default(tmp_path):
    path = write(tmp_path, {**base_config(), "train": {"epochs": 7, "batch_size": 4}})
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.accumulate) == (7, 4, 1)  # file, file, default
    cfg = load_config(path, ["train.epochs=3", "train.accumulate=2"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.accumulate) == (3, 4, 2)  # cli, file, cli
    # A repeated override: the last one wins.
    assert load_config(path, ["train.epochs=3", "train.epochs=9"]).train.epochs == 9


def test_override_values_are_yaml_typed(tmp_path):
    path = write(tmp_path, base_config())
    cfg = load_config(path, ["train.optimizer.lr=1e-3", "run.deterministic=false", "data.classes=[a, b]",
                             "train.max_steps=null", "train.optimizer.betas=[0.8, 0.9]"])
    assert cfg.train.optimizer.lr == pytest.approx(1e-3)
    assert cfg.run.deterministic is False
    assert cfg.data.classes == ["a", "b"]
    assert cfg.train.max_steps is None
    assert cfg.train.optimizer.betas == (0.8, 0.9)


def test_override_errors(tmp_path):
    path = write(tmp_path, base_config())
    with pytest.raises(DetpactError, match="Bad --set override"):
        load_config(path, ["train.epochs"])
    with pytest.raises(DetpactError, match="unknown key 'train.nope'"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(DetpactError, match="'train.epochs'"):
        load_config(path, ["train.epochs=abc"])
    with pytest.raises(DetpactError, match="is a value, not a section"):
        load_config(write(tmp_path, {**base_config(), "task": "shapes"}), ["task.sub=1"])


def test_hash_stable_and_sensitive():
    cfg = load_config(QUICKSTART)
    assert config_hash(cfg) == config_hash(load_config(QUICKSTART))
    assert len(config_hash(cfg)) == 64
    # Result-neutral keys do not change the hash ...
    neutral = load_config(QUICKSTART, ["run.name=other", "run.output_root=/elsewhere", "logging.progress=false",
                                       "data.num_workers=0", "task=other"])
    assert config_hash(neutral) == config_hash(cfg)
    # ... keys that change results do.
    for override in ("train.optimizer.lr=0.1", "run.seed=1", "data.image_size=224", "model.backbone.args.depth_mult=1"):
        assert config_hash(load_config(QUICKSTART, [override])) != config_hash(cfg), override


def test_hash_ignores_key_order_and_explicit_defaults(tmp_path):
    a = {**base_config(), "train": {"epochs": 3, "batch_size": 4}}
    b = {"train": {"batch_size": 4, "epochs": 3, "accumulate": 1}, "data": {"format": "synthetic"}, "config_version": 1}
    assert config_hash(validate_config(a)) == config_hash(validate_config(copy.deepcopy(b)))


def test_resolved_yaml_round_trips_to_same_hash(tmp_path):
    cfg = load_config(QUICKSTART, ["train.optimizer.lr=3e-4", "train.max_steps=17"])
    path = tmp_path / "config_resolved.yaml"
    path.write_text(dump_config_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_diff_lists_exactly_the_hashed_keys_that_differ():
    old = load_config(QUICKSTART)
    new = load_config(QUICKSTART, ["train.optimizer.lr=0.1", "run.name=renamed", "logging.progress=false"])
    assert diff_configs(resolved_dict(old), new) == ["train.optimizer.lr: 0.002 -> 0.1"]
    assert diff_configs(old, load_config(QUICKSTART, ["data.num_workers=0"])) == []


def test_a_preset_is_a_diff_over_its_base(tmp_path):
    base = {**base_config(), "train": {"epochs": 7, "batch_size": 4}, "model": {"backbone": {"name": "cspdarknet_n"}}}
    write(tmp_path, base, "base.yaml")
    (tmp_path / "presets").mkdir()
    preset = {"base": "../base.yaml", "train": {"epochs": 3}, "model": {"backbone": {"name": "resnet18"}}}
    cfg = load_config(write(tmp_path / "presets", preset, "r18.yaml"), ["train.batch_size=2"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 2)  # preset over base, --set over both
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.args == {"drop_path": 0.0}
    cfg = load_config(tmp_path / "base.yaml")
    assert cfg.model.backbone.name == "cspdarknet" and cfg.model.backbone.args["size"] == "n"


def test_a_base_cycle_is_refused(tmp_path):
    write(tmp_path, {**base_config(), "base": "b.yaml"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(DetpactError, match="its own base"):
        load_config(tmp_path / "a.yaml")


def test_backbone_families_check_their_args():
    cfg = validate_config({**base_config(), "model": {"backbone": {"name": "cspdarknet", "args": {"size": "m"}}}})
    assert (cfg.model.backbone.args["width_mult"], cfg.model.backbone.args["depth_mult"]) == (0.75, 0.67)
    explicit = {"name": "cspdarknet", "args": {"size": "m", "width_mult": 0.5}}
    assert validate_config({**base_config(), "model": {"backbone": explicit}}).model.backbone.args["width_mult"] == 0.5
    with pytest.raises(DetpactError, match="unknown backbone 'resnet99'.*resnet18"):
        validate_config({**base_config(), "model": {"backbone": {"name": "resnet99"}}})
    with pytest.raises(DetpactError, match="Valid keys of resnet18's args: drop_path"):
        validate_config({**base_config(), "model": {"backbone": {"name": "resnet18", "args": {"width_mult": 1}}}})
    with pytest.raises(DetpactError, match="LayerNorm"):
        validate_config({**base_config(), "model": {"backbone": {"name": "convnext_tiny", "norm": "frozen_bn"}}})


def test_rtdetr_head_defaults_to_no_neck_and_a_256_projector():
    cfg = validate_config({**base_config(), "model": {"head": {"name": "rtdetr"}}})
    assert cfg.model.neck.name == "none" and cfg.model.projector.d_model == 256
    cfg = validate_config({**base_config(), "model": {"head": {"name": "rtdetr"}, "neck": {"name": "pan"},
                                                      "projector": {"d_model": 64}}})
    assert cfg.model.neck.name == "pan" and cfg.model.projector.d_model == 64
    # the resolved config loads back to the same config
    assert validate_config(resolved_dict(cfg)) == cfg


# configs/datasets/ holds Ultralytics dataset YAMLs and configs/scenarios/ scenario settings, not detpact configs.
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in ("datasets", "scenarios"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    build_model(cfg.model, num_classes=3)
    assert validate_config(resolved_dict(cfg)) == cfg  # the resolved form loads back as the same config


def test_rtdetr_sizes_are_checked_when_the_config_loads():
    rtdetr = {"head": {"name": "rtdetr", "rtdetr": {"num_queries": 300}}}
    with pytest.raises(DetpactError, match=r"num_queries \(300\) exceeds the 84 positions of a 64 px input"):
        validate_config({**base_config(), "data": {"format": "synthetic", "image_size": 64}, "model": rtdetr})
    with pytest.raises(DetpactError, match="exceeds the 84 positions of a 64 px input"):  # multi-scale's smallest
        validate_config({**base_config(), "data": {"format": "synthetic", "image_size": 256, "multi_scale": 0.7},
                         "model": rtdetr})
    validate_config({**base_config(), "data": {"format": "synthetic", "image_size": 256, "multi_scale": 0.5},
                     "model": rtdetr})  # 128 px: 336 positions
    with pytest.raises(DetpactError, match=r"num_heads \(8\) must divide model.projector.d_model \(100\)"):
        validate_config({**base_config(), "model": {**rtdetr, "projector": {"d_model": 100}}})
