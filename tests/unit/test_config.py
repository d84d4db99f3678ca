"""Config: schema errors name the key, overrides take priority, the hash is stable."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from detpact.config import config_hash, diff_configs, dump_config_yaml, load_config, resolved_dict, validate_config
from detpact.errors import DetpactError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
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
    raw = {**base(), **section}
    with pytest.raises(DetpactError) as err:
        load_config(write(tmp_path, raw))
    message = err.value.message
    assert f"unknown key '{typo}'" in message
    assert f"Did you mean '{suggestion}'?" in message
    assert "Valid keys" in message and suggestion in message
    assert "cfg.yaml" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    raw = {**base(), "train": {"epochs": "ten"}}
    with pytest.raises(DetpactError) as err:
        load_config(write(tmp_path, raw))
    assert "'train.epochs'" in err.value.message and "'ten'" in err.value.message


def test_all_errors_reported_at_once(tmp_path):
    raw = {**base(), "train": {"epochs": "ten", "batch_size": -1}, "eval": {"bogus": 1}}
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
        load_config(write(tmp_path, {**base(), "config_version": 2}))


def test_real_data_needs_a_path(tmp_path):
    with pytest.raises(DetpactError, match="data.path is required"):
        load_config(write(tmp_path, {"config_version": 1, "data": {"format": "yolo"}}))


def test_override_precedence_cli_over_file_over_default(tmp_path):
    path = write(tmp_path, {**base(), "train": {"epochs": 7, "batch_size": 4}})
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.accumulate) == (7, 4, 1)  # file, file, default
    cfg = load_config(path, ["train.epochs=3", "train.accumulate=2"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.accumulate) == (3, 4, 2)  # cli, file, cli
    # A repeated override: the last one wins.
    assert load_config(path, ["train.epochs=3", "train.epochs=9"]).train.epochs == 9


def test_override_values_are_yaml_typed(tmp_path):
    path = write(tmp_path, base())
    cfg = load_config(path, ["train.optimizer.lr=1e-3", "run.deterministic=false", "data.classes=[a, b]",
                             "train.max_steps=null", "train.optimizer.betas=[0.8, 0.9]"])
    assert cfg.train.optimizer.lr == pytest.approx(1e-3)
    assert cfg.run.deterministic is False
    assert cfg.data.classes == ["a", "b"]
    assert cfg.train.max_steps is None
    assert cfg.train.optimizer.betas == (0.8, 0.9)


def test_override_errors(tmp_path):
    path = write(tmp_path, base())
    with pytest.raises(DetpactError, match="Bad --set override"):
        load_config(path, ["train.epochs"])
    with pytest.raises(DetpactError, match="unknown key 'train.nope'"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(DetpactError, match="'train.epochs'"):
        load_config(path, ["train.epochs=abc"])
    with pytest.raises(DetpactError, match="is a value, not a section"):
        load_config(write(tmp_path, {**base(), "task": "shapes"}), ["task.sub=1"])


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
    a = {**base(), "train": {"epochs": 3, "batch_size": 4}}
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
