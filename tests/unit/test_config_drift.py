"""Resuming checks the config against the one the run started with: a key added to the
schema since (at its default) is no drift; a changed value is."""

from __future__ import annotations

import copy

import pytest

from conftest import TINY_CONFIG
from detpact.config import resolved_dict, validate_config
from detpact.errors import DetpactError
from detpact.run.contract import RunDir
from detpact.run.session import check_config_drift


def test_a_key_added_since_the_run_started_is_no_drift_but_a_changed_value_is(tmp_path):
    cfg = validate_config(copy.deepcopy(TINY_CONFIG))
    stored = resolved_dict(cfg)
    del stored["train"]["qlora"]  # a config written before train.qlora existed
    drift: dict = {}
    check_config_drift(RunDir(tmp_path), stored, cfg, drift, allow_drift=False)
    assert drift == {}

    stored["train"]["epochs"] = cfg.train.epochs + 1
    with pytest.raises(DetpactError, match=f"train.epochs: {cfg.train.epochs + 1} -> {cfg.train.epochs}"):
        check_config_drift(RunDir(tmp_path), stored, cfg, drift, allow_drift=False)
    check_config_drift(RunDir(tmp_path), stored, cfg, drift, allow_drift=True)
    assert drift["config"]["changes"] == [f"train.epochs: {cfg.train.epochs + 1} -> {cfg.train.epochs}"]

    stored["train"]["no_such_key"] = 1  # a key this version does not know: compared as stored, so it shows
    with pytest.raises(DetpactError, match="no_such_key"):
        check_config_drift(RunDir(tmp_path), stored, cfg, {}, allow_drift=False)
