"""Training stages (the stage of each step, freezing by module prefix, the lr multiplier) and the
time budget's arithmetic."""

from __future__ import annotations

import pytest
import torch
from test_engine import batches, make_parts

from detpact.config import HeadConfig
from detpact.config.train import StageConfig
from detpact.engine.stages import StageSwitch, stage_at
from detpact.engine.step import train_step
from detpact.errors import DetpactError
from detpact.models.losses import build_criterion

STAGES = [StageConfig(steps=2, freeze=["backbone"], lr_mult=0.1), StageConfig(steps=3, freeze=["head.cls_branches"])]


def test_stage_of_each_step():
    assert [stage_at(STAGES, done) for done in range(7)] == [0, 0, 1, 1, 1, None, None]
    assert stage_at([], 0) is None


def test_a_frozen_part_does_not_move_and_comes_back_after_its_stage():
    parts = make_parts(build_criterion(HeadConfig()))
    switch = StageSwitch(parts.model, STAGES)
    backbone = [p.detach().clone() for p in parts.model.backbone.parameters()]
    head = [p.detach().clone() for p in parts.model.head.parameters()]

    assert switch.update(0) == 0.1
    assert train_step(parts, batches(2), lr=1e-2, step=1) is not None
    assert all(torch.equal(a, b) for a, b in zip(backbone, parts.model.backbone.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(head, parts.model.head.parameters()))

    assert switch.update(2) == 1.0 and switch.current == 1
    frozen = {n for n, p in parts.model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("head.cls_branches") for n in frozen)
    switch.update(5)
    assert switch.current is None and all(p.requires_grad for p in parts.model.parameters())


def test_model_freeze_stays_frozen_after_the_stages():
    parts = make_parts(build_criterion(HeadConfig()))
    for p in parts.model.neck.parameters():
        p.requires_grad_(False)  # as model.freeze: [neck]
    switch = StageSwitch(parts.model, STAGES)
    switch.update(0)
    switch.update(9)
    assert not any(p.requires_grad for p in parts.model.neck.parameters())
    assert all(p.requires_grad for p in parts.model.backbone.parameters())


def test_an_unknown_prefix_names_the_modules():
    parts = make_parts(build_criterion(HeadConfig()))
    with pytest.raises(DetpactError, match=r"stages\[0\].freeze: no parameter .* under 'backbon'.*'backbone'"):
        StageSwitch(parts.model, [StageConfig(steps=1, freeze=["backbon"])])


def test_time_budget_steps_against_hand_computation():
    from detpact.engine.budget import steps_within

    # 100 s; 0.5 s a step; a 4 s validation every 10 steps (0.4 s a step) and a final one.
    assert steps_within(100.0, 0.5, 4.0, 0.1, None) == 106  # floor((100 - 4) / 0.9)
    assert steps_within(100.0, 0.5, 4.0, 0.1, 50) == 50  # max_steps caps it
    assert steps_within(1.0, 5.0, 0.0, 0.0, None) == 1  # at least one step
