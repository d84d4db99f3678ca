"""Loss balancing (engine/balance.py): the box-loss warm-up, per-component clipping, the
uncertainty task aligner, and the all-off path equal to the criteria's own total."""

from __future__ import annotations

import math

import pytest
import torch

from detpact.config import HeadConfig, RTDETRConfig, SetLossConfig
from detpact.engine import balance
from detpact.engine.balance import UncertaintyWeights, balanced_loss, box_loss_scale, clip_component
from detpact.models.boxes import box_cxcywh_to_xyxy
from detpact.models.losses import DetectionCriterion, SetCriterion, WeightedTerm, build_criterion
from detpact.models.outputs import DetectorOutput, DetrOutput, QueryPrediction

NUM_CLASSES = 3
IMAGE_SIZE = (64, 64)  # (H, W)
# The dense heads: centre sampling with plain box sides, and task-aligned with DFL bins.
DENSE_HEADS = {"centre_sampling": {"loss": {"quality_gamma": 2.0}},
               "task_aligned_dfl": {"reg_max": 16, "assigner": {"name": "task_aligned"}}}
ALL_OFF = {"box_scale": 1.0, "clip": None, "aligner": None}


def pixel_targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 4.0, 60.0, 24.0]]), "labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[12.0, 12.0, 52.0, 44.0]]), "labels": torch.tensor([1])}]


def dense_output(reg_max: int, seed: int = 0) -> DetectorOutput:
    """Random predictions on the 8 x 8 grid of stride 8, decoded as the dense head does."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(8) * 8 + 4.0, torch.arange(8) * 8 + 4.0, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1)  # [64, 2]
    strides = torch.full((64,), 8.0)
    logits = torch.randn(2, 64, NUM_CLASSES, generator=gen).requires_grad_()
    box_logits = None
    if reg_max > 1:
        box_logits = torch.randn(2, 64, 4, reg_max, generator=gen).requires_grad_()
        sides = (box_logits.softmax(-1) @ torch.arange(reg_max, dtype=torch.float32)) * 8.0  # [2, 64, 4]
    else:
        sides = torch.exp(torch.randn(2, 64, 4, generator=gen).requires_grad_()) * 8.0
    boxes = torch.cat([points - sides[..., :2], points + sides[..., 2:]], dim=-1)
    return DetectorOutput(logits, boxes, points, strides, box_logits)


def rtdetr_output(seed: int = 0) -> DetrOutput:
    """Two decoder layers and the encoder's proposals, random."""
    gen = torch.Generator().manual_seed(seed)

    def prediction() -> QueryPrediction:
        logits = torch.randn(2, 5, NUM_CLASSES, generator=gen).requires_grad_()
        centres, sizes = 0.2 + 0.6 * torch.rand(2, 5, 2, generator=gen), 0.1 + 0.3 * torch.rand(2, 5, 2, generator=gen)
        return QueryPrediction(logits, torch.cat([centres, sizes], -1).requires_grad_())

    layers, encoder = [prediction(), prediction()], prediction()
    pixels = box_cxcywh_to_xyxy(layers[-1].boxes.detach()) * 64.0
    return DetrOutput(layers[-1].logits, pixels, IMAGE_SIZE, layers, encoder)


def dense_case(name: str) -> tuple[DetectionCriterion, DetectorOutput]:
    head = HeadConfig.model_validate(DENSE_HEADS[name])
    criterion = build_criterion(head)
    assert isinstance(criterion, DetectionCriterion)
    return criterion, dense_output(head.reg_max)


def rtdetr_case() -> tuple[SetCriterion, DetrOutput]:
    weights = SetLossConfig(vfl_weight=0.7, l1_weight=3.0, giou_weight=1.5)
    criterion = build_criterion(HeadConfig(name="rtdetr", rtdetr=RTDETRConfig(loss=weights)))
    assert isinstance(criterion, SetCriterion)
    return criterion, rtdetr_output()


CASES = {"dense_" + name: (lambda name=name: dense_case(name)) for name in DENSE_HEADS} | {"rtdetr": rtdetr_case}


# ---------------------------------------------------------------- box-loss warm-up


def test_box_loss_scale_ramps_linearly_then_holds():
    # From 0.2 to 1.0 over 4 epochs: +0.2 per epoch.
    assert box_loss_scale(0.0, 4.0, 0.2, 1.0) == 0.2
    assert box_loss_scale(1.0, 4.0, 0.2, 1.0) == pytest.approx(0.4)
    assert box_loss_scale(2.5, 4.0, 0.2, 1.0) == pytest.approx(0.7)
    assert box_loss_scale(4.0, 4.0, 0.2, 1.0) == 1.0
    assert box_loss_scale(9.3, 4.0, 0.2, 1.0) == 1.0
    # A step count as fractional epochs (step 30 of 20 per epoch), and a falling ramp.
    assert box_loss_scale(30 / 20, 3.0, 2.0, 1.0) == pytest.approx(1.5)
    assert box_loss_scale(0.0, 0.0, 0.2, 1.0) == 1.0  # no warm-up: the end value from the start


# ---------------------------------------------------------------- clipping


def test_clipping_reaches_the_limit_and_keeps_the_gradient_direction():
    for slope in (3.0, -3.0):  # a gradient of either sign
        p = torch.tensor(1.0, requires_grad=True)
        value = 20.0 + slope * (p - 1.0) + 0.0 * p  # 20 at p = 1, d value / dp = slope
        clipped = clip_component(value, 4.0)
        assert clipped.item() == pytest.approx(4.0, rel=1e-7)
        clipped.backward()
        # Not a clamp (gradient 0): the gradient is the slope scaled by limit / value.
        assert p.grad is not None and p.grad.item() != 0.0
        assert math.copysign(1.0, p.grad.item()) == math.copysign(1.0, slope)
        assert p.grad.item() == pytest.approx(slope * 4.0 / 20.0)


def test_clipping_below_the_limit_or_off_changes_nothing():
    p = torch.tensor(2.0, requires_grad=True)
    value = p * 1.5
    assert clip_component(value, None) is value
    below = clip_component(value, 10.0)
    assert torch.equal(below, value)
    below.backward()
    assert p.grad.item() == 1.5
    with pytest.raises(ValueError, match="positive"):
        clip_component(value, 0.0)


def test_balanced_loss_clips_each_raw_component_and_logs_which():
    big, small = torch.tensor(50.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    terms = {"loss_cls": WeightedTerm(2.0, big), "loss_box": WeightedTerm(3.0, small)}
    total, logged = balanced_loss(terms, box_scale=1.0, clip=5.0, aligner=None)
    assert total.item() == pytest.approx(2.0 * 5.0 + 3.0 * 0.5)
    assert logged == {"box_scale": 1.0, "clipped/loss_cls": 1.0, "clipped/loss_box": 0.0}


# ---------------------------------------------------------------- uncertainty weights


def test_uncertainty_weights_learn_and_are_logged_as_exp_minus_s():
    aligner = UncertaintyWeights(["loss_cls", "loss_box"])
    assert sorted(aligner.state_dict()) == ["log_vars.loss_box", "log_vars.loss_cls"]
    assert len(list(aligner.parameters())) == 2  # what the optimizer must be given
    cls, box = torch.tensor(0.8, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    terms = {"loss_cls": WeightedTerm(0.5, cls), "loss_box": WeightedTerm(7.5, box)}

    # At s = 0 the aligned total is the plain weighted sum.
    total, logged = balanced_loss(terms, box_scale=1.0, clip=None, aligner=aligner)
    assert total.item() == pytest.approx(0.5 * 0.8 + 7.5 * 0.3)
    assert logged["task_weight/loss_cls"] == logged["task_weight/loss_box"] == 1.0

    with torch.no_grad():
        aligner.log_vars["loss_cls"].fill_(0.4)
        aligner.log_vars["loss_box"].fill_(-0.7)
    total, logged = balanced_loss(terms, box_scale=1.0, clip=None, aligner=aligner)
    expected = math.exp(-0.4) * 0.5 * 0.8 + 0.4 + math.exp(0.7) * 7.5 * 0.3 - 0.7
    assert total.item() == pytest.approx(expected)
    assert logged["task_weight/loss_cls"] == pytest.approx(math.exp(-0.4))
    assert logged["task_weight/loss_box"] == pytest.approx(math.exp(0.7))
    total.backward()
    # d total / d s_i = 1 - exp(-s_i) * w_i * L_i
    grads = {name: s.grad for name, s in aligner.log_vars.items()}
    assert all(g is not None and g.item() != 0.0 for g in grads.values())
    assert grads["loss_cls"].item() == pytest.approx(1 - math.exp(-0.4) * 0.5 * 0.8)
    assert grads["loss_box"].item() == pytest.approx(1 - math.exp(0.7) * 7.5 * 0.3)
    assert box.grad.item() == pytest.approx(math.exp(0.7) * 7.5)  # the components still learn


def test_uncertainty_weights_refuse_a_component_they_were_not_built_for():
    aligner = UncertaintyWeights(["loss_cls"])
    with pytest.raises(ValueError, match="loss_dfl"):
        aligner({"loss_cls": torch.tensor(1.0), "loss_dfl": torch.tensor(1.0)})


def test_build_task_aligner_by_name():
    assert balance.build_task_aligner(None, ["loss_cls"]) is None
    assert balance.build_task_aligner("none", ["loss_cls"]) is None
    assert isinstance(balance.build_task_aligner("uncertainty", ["loss_cls"]), UncertaintyWeights)
    with pytest.raises(ValueError, match="uncertainty"):
        balance.build_task_aligner("gradnorm", ["loss_cls"])


# ---------------------------------------------------------------- on the real criteria


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_all_off_is_the_criterion_total_bit_for_bit(case):
    criterion, outputs = case()
    losses, terms = criterion.with_terms(outputs, pixel_targets())
    assert tuple(terms) == criterion.components
    # The dict is unchanged: all tensors, the components detached copies of the terms.
    assert all(isinstance(v, torch.Tensor) for v in losses.values())
    assert all(torch.equal(losses[k], t.value) and not losses[k].requires_grad for k, t in terms.items())
    total, logged = balanced_loss(terms, **ALL_OFF)
    assert torch.equal(total, losses["loss"]) and logged == {"box_scale": 1.0}
    # ... and "loss" is still the criteria's own expression, left to right.
    (w0, v0), (w1, v1), *rest = terms.values()
    expected = w0 * v0 + w1 * v1
    for w, v in rest:
        expected = expected + w * v
    assert torch.equal(losses["loss"], expected)
    assert torch.equal(criterion(outputs, pixel_targets())["loss"], losses["loss"])  # __call__ is the same dict


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_box_scale_reaches_only_the_box_components(case):
    criterion, outputs = case()
    losses, terms = criterion.with_terms(outputs, pixel_targets())
    # Exactly one classification component per criterion; every other one is a box one.
    classification = [name for name in terms if name not in balance.BOX_COMPONENTS]
    assert classification in (["loss_cls"], ["loss_vfl"])
    assert len(terms) > 1
    weight, value = terms[classification[0]]
    box_part = losses["loss"] - weight * value
    assert box_part.item() > 0  # otherwise the scale would have nothing to change
    total, _ = balanced_loss(terms, box_scale=0.25, clip=None, aligner=None)
    torch.testing.assert_close(total, weight * value + 0.25 * box_part)
    total.backward()  # and it is differentiable back to the predictions
