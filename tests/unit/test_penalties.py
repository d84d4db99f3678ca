"""The continual-learning penalties (engine/penalties/) against values worked out by hand
on tiny modules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detpact.config.continual import ContinualConfig, DerppConfig, SelfDistillConfig, SIConfig
from detpact.engine.penalties import build_penalties, load_previous
from detpact.engine.penalties.derpp import DerppReplay
from detpact.engine.penalties.distill import SelfDistill
from detpact.engine.penalties.ewc import EWC, estimate_fisher
from detpact.engine.penalties.handoff import save_continual_state
from detpact.engine.penalties.si import SI
from detpact.errors import DetpactError

CPU = torch.device("cpu")


class FixedHead(nn.Module):
    """A 'detector' whose outputs are fixed tensors (what a teacher predicts)."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.register_buffer("boxes", boxes)

    def forward(self, images: torch.Tensor, targets=None) -> SimpleNamespace:
        return SimpleNamespace(cls_logits=self.logits.expand(len(images), -1, -1),
                               boxes=self.boxes.expand(len(images), -1, -1))


def _distill(kl: str, keys: list[str], weight: float = 2.0, temperature: float = 1.0) -> SelfDistill:
    # teacher: one location, two classes with logits ln 3 (p = 3/4) and 0 (p = 1/2); one box
    teacher = FixedHead(torch.tensor([[[math.log(3.0), 0.0]]]), torch.tensor([[[0.0, 0.0, 10.0, 20.0]]]))
    cfg = SelfDistillConfig(teacher="unused.pt", weight=weight, temperature=temperature, kl=kl, keys=keys)
    return SelfDistill(cfg, teacher, CPU, "none")


def _student_outputs() -> SimpleNamespace:
    # student: both classes at logit 0 (q = 1/2); its box 4 px off on x1 and 8 px on y2
    return SimpleNamespace(cls_logits=torch.zeros(1, 1, 2), boxes=torch.tensor([[[4.0, 0.0, 10.0, 28.0]]]))


IMAGES = torch.zeros(1, 3, 32, 40)  # H 32, W 40


def test_distill_forward_kl_matches_hand_value():
    # KL(3/4 || 1/2) = 3/4 ln(3/2) + 1/4 ln(1/2); the second class matches (0); mean over 2
    expected = 2.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    losses = _distill("forward", ["logits"]).losses(None, IMAGES, [], _student_outputs())
    assert list(losses) == ["loss_distill"]
    assert losses["loss_distill"].item() == pytest.approx(expected, rel=1e-6)


def test_distill_reverse_and_sym_kl_match_hand_values():
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(1/2 || 3/4)
    forward = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got_reverse = _distill("reverse", ["logits"], weight=1.0).losses(None, IMAGES, [], _student_outputs())
    got_sym = _distill("sym", ["logits"], weight=1.0).losses(None, IMAGES, [], _student_outputs())
    assert got_reverse["loss_distill"].item() == pytest.approx(reverse / 2, rel=1e-6)
    assert got_sym["loss_distill"].item() == pytest.approx((forward + reverse) / 4, rel=1e-6)


def test_distill_temperature_and_boxes():
    # T = 2: teacher logit ln 3 / 2 -> p = sqrt(3) / (1 + sqrt(3)); times T^2 = 4
    p = math.sqrt(3) / (1 + math.sqrt(3))
    logits = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)) / 2
    boxes = (4 / 40 + 8 / 32) / 4  # mean L1 over the 4 coordinates, in fractions of W, H
    losses = _distill("forward", ["logits", "bbox"], weight=1.0, temperature=2.0).losses(
        None, IMAGES, [], _student_outputs())
    assert losses["loss_distill"].item() == pytest.approx(logits + boxes, rel=1e-6)
    only_boxes = _distill("forward", ["bbox"], weight=3.0).losses(None, IMAGES, [], _student_outputs())
    assert only_boxes["loss_distill"].item() == pytest.approx(3 * boxes, rel=1e-6)


def test_distill_gradient_reaches_the_student_only():
    student = _student_outputs()
    student.cls_logits.requires_grad_(True)
    penalty = _distill("forward", ["logits"])
    penalty.losses(None, IMAGES, [], student)["loss_distill"].backward()
    # d/dz KL(p || sigmoid(z)) = sigmoid(z) - p: (1/2 - 3/4) for class 0, x weight 2 / 2 elements
    assert student.cls_logits.grad.flatten().tolist() == pytest.approx([-0.25, 0.0])
    assert all(not b.requires_grad for b in penalty.teacher.buffers())
    assert not penalty.teacher.training


def test_distill_refuses_a_teacher_with_other_classes_and_a_changed_file():
    penalty = _distill("forward", ["logits"])
    wrong = SimpleNamespace(cls_logits=torch.zeros(1, 1, 3), boxes=torch.zeros(1, 1, 4))
    with pytest.raises(DetpactError, match="same head and classes"):
        penalty.losses(None, IMAGES, [], wrong)
    penalty.teacher_sha256 = "abc"
    penalty.load_state_dict({"teacher_sha256": "abc"})
    with pytest.raises(DetpactError, match="changed since the run started"):
        penalty.load_state_dict({"teacher_sha256": "def"})


# --- EWC ---------------------------------------------------------------------------------

class Probe(nn.Module):
    """A 1x1 convolution without bias: the sum of its output has gradient sum(x) per channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, images: torch.Tensor, targets=None) -> torch.Tensor:
        return self.conv(images)


def _sum_loss(outputs, targets) -> dict[str, torch.Tensor]:
    return {"loss": outputs.sum()}


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, targets=None) -> torch.Tensor:  # a detector's signature
        return super().forward(x)


def _linear(weight: list[float], bias: float) -> nn.Linear:
    layer = Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


def test_ewc_matches_hand_value_and_pulls_towards_the_anchor():
    model = _linear([1.0, 2.0], 0.5)
    fisher = {"weight": torch.tensor([[2.0, 0.0]]), "bias": torch.tensor([4.0])}
    anchor = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    penalty = EWC(2.0, fisher, anchor, model, CPU)
    loss = penalty.losses(model, IMAGES, [], None)["loss_ewc"]
    assert loss.item() == pytest.approx(2.0 / 2 * (2 * 1 + 0 * 4 + 4 * 0.25))  # lambda/2 sum F (theta - theta*)^2
    loss.backward()
    # d/dtheta = lambda F (theta - theta*): [2 x 2 x 1, 0], 2 x 4 x 0.5
    assert model.weight.grad.tolist() == [[4.0, 0.0]] and model.bias.grad.tolist() == [4.0]
    restored = EWC(2.0, {n: torch.zeros_like(t) for n, t in fisher.items()}, anchor, model, CPU)
    restored.load_state_dict(penalty.state_dict())
    assert restored.losses(model, IMAGES, [], None)["loss_ewc"].item() == loss.item()


def test_ewc_refuses_a_fisher_of_another_model():
    with pytest.raises(DetpactError, match="does not fit this model"):
        EWC(1.0, {"weight": torch.ones(3, 2)}, {"weight": torch.ones(3, 2)}, _linear([1.0, 2.0], 0.0), CPU)


def _batches(*counts: int):
    """Batches of uint8 images of ones (255 -> 1.0), `count` images each."""
    return [(torch.full((n, 3, 1, 1), 255, dtype=torch.uint8), [{}] * n) for n in counts]


def test_fisher_is_the_mean_squared_batch_gradient():
    model = Probe()
    # gradients: batch of 1 image -> 1 per channel, batch of 2 -> 2; the third is not used
    fisher = estimate_fisher(model, _sum_loss, _batches(1, 2, 2), 2, CPU, "none", False)
    assert fisher["conv.weight"].flatten().tolist() == [2.5, 2.5, 2.5]  # (1^2 + 2^2) / 2
    assert model.conv.weight.grad is None  # estimated on a copy


def test_saved_state_folds_in_the_previous_fisher_and_feeds_the_next_run(tmp_path):
    model = Probe()
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    save_continual_state(first, ContinualConfig(), None, model, _sum_loss, _batches(1), CPU, "none", False)
    state = load_previous(str(first))
    assert state["ewc"]["fisher"]["conv.weight"].flatten().tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(state["anchor"]["conv.weight"], model.conv.weight.detach())
    online = ContinualConfig(previous=str(first), ewc={"gamma": 0.5})
    save_continual_state(second, online, None, model, _sum_loss, _batches(2), CPU, "none", False)
    assert load_previous(str(second))["ewc"]["fisher"]["conv.weight"].flatten().tolist() == [4.5] * 3  # 0.5 x 1 + 4
    penalties = build_penalties(ContinualConfig(previous=str(second), ewc={"weight": 1.0}), model, _sum_loss, CPU,
                                "none")
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # one away from the anchor on each of 3 weights
    assert penalties.losses(model, IMAGES, [], None)["loss_ewc"].item() == pytest.approx(0.5 * 3 * 4.5)


def test_ewc_without_a_previous_state_is_refused(tmp_path):
    with pytest.raises(DetpactError, match="needs the previous task's ewc state"):
        build_penalties(ContinualConfig(ewc={"weight": 1.0}), Probe(), _sum_loss, CPU, "none")
    not_state = tmp_path / "x.pt"
    torch.save({"format_version": 1}, not_state)
    with pytest.raises(DetpactError, match="not a continual state file"):
        build_penalties(ContinualConfig(previous=str(not_state), ewc={"weight": 1.0}), Probe(), _sum_loss, CPU,
                        "none")


# --- SI ----------------------------------------------------------------------------------

def _move(model: nn.Linear, grad_w: list[float], grad_b: float, weight: list[float], bias: float) -> None:
    """One 'optimizer step': the gradient it applied, then the weights it left."""
    model.weight.grad, model.bias.grad = torch.tensor([grad_w]), torch.tensor([grad_b])
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
        model.bias.fill_(bias)


def test_si_path_integral_and_importance_match_hand_values():
    model = _linear([1.0, 2.0], 0.5)
    si = SI(SIConfig(epsilon=0.5), model, CPU, track=True)
    assert si.losses(model, IMAGES, [], None) == {}  # c = 0: tracking only
    _move(model, [1.0, -1.0], 2.0, [0.5, 2.5], 0.0)  # moves -0.5, +0.5; -0.5
    si.after_step(model)
    assert si.omega["weight"].tolist() == [[0.5, 0.5]] and si.omega["bias"].tolist() == [1.0]  # -g x move
    resumed = SI(SIConfig(epsilon=0.5), _linear([9.0, 9.0], 9.0), CPU, track=True)
    resumed.load_state_dict(si.state_dict())
    _move(model, [0.0, 1.0], -1.0, [0.5, 3.5], 0.5)  # moves 0, +1; +0.5
    for tracker in (si, resumed):
        tracker.after_step(model)
        assert tracker.omega["weight"].tolist() == [[0.5, -0.5]] and tracker.omega["bias"].tolist() == [1.5]
        # Omega = max(omega, 0) / (total move^2 + epsilon): moves [-0.5, 1.5] and 0
        importance = tracker.run_importance()
        assert importance["weight"].flatten().tolist() == pytest.approx([0.5 / 0.75, 0.0])
        assert importance["bias"].tolist() == pytest.approx([1.5 / 0.5])


def test_si_penalty_matches_hand_value():
    model = _linear([1.0, 2.0], 0.5)
    importance = {"weight": torch.tensor([[1.0, 1.0]]), "bias": torch.tensor([2.0])}
    anchor = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    si = SI(SIConfig(c=3.0), model, CPU, track=False, importance=importance, anchor=anchor)
    # c x sum Omega (theta - theta*)^2 = 3 x (1 + 4 + 2 x 0.25)
    assert si.losses(model, IMAGES, [], None)["loss_si"].item() == pytest.approx(16.5)


def test_si_importance_is_saved_added_to_the_previous_one(tmp_path):
    model = _linear([1.0, 2.0], 0.5)
    penalties = build_penalties(ContinualConfig(save_state=True, si={"epsilon": 0.5}), model, _sum_loss, CPU, "none")
    _move(model, [1.0, -1.0], 2.0, [0.5, 2.5], 0.0)
    penalties.after_step(model)
    first = tmp_path / "a.pt"
    batches = [(torch.full((1, 2), 255, dtype=torch.uint8), [{}])]
    save_continual_state(first, ContinualConfig(save_state=True), penalties, model, _sum_loss, batches, CPU, "none",
                         False)
    # omega [0.5, 0.5], 1 over moves [-0.5, 0.5], -0.5: 0.5 / 0.75 and 1 / 0.75
    saved = load_previous(str(first))["si"]["importance"]
    assert saved["weight"].flatten().tolist() == pytest.approx([2 / 3, 2 / 3]) and saved["bias"].item() == \
        pytest.approx(4 / 3)
    second_cfg = ContinualConfig(previous=str(first), save_state=True, si={"c": 1.0, "epsilon": 0.5})
    again = build_penalties(second_cfg, model, _sum_loss, CPU, "none")
    assert again.losses(model, IMAGES, [], None)["loss_si"].item() == 0.0  # at the anchor
    second = tmp_path / "b.pt"
    save_continual_state(second, second_cfg, again, model, _sum_loss, batches, CPU, "none", False)
    assert load_previous(str(second))["si"]["importance"]["bias"].item() == pytest.approx(4 / 3)  # + 0: no steps


# --- DER++ -------------------------------------------------------------------------------

class Gain(nn.Module):
    """cls_logits = w x pixels, one 'location' per pixel value and one class."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, images: torch.Tensor, targets=None) -> SimpleNamespace:
        return SimpleNamespace(cls_logits=self.w * images.flatten(1)[:, :, None])


def _count_loss(outputs, targets) -> dict[str, torch.Tensor]:
    """Mean logit plus the number of boxes: a label term whose value is easy to follow."""
    return {"loss": outputs.cls_logits.mean() + sum(len(t["labels"]) for t in targets)}


def _target(boxes: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.ones(boxes, 4), "labels": torch.zeros(boxes, dtype=torch.int64)}


def _pixels(*values: int) -> torch.Tensor:
    """One 1x1 px image per value, as the step hands them over (uint8 / 255)."""
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 1, 1).float() / 255


def _derpp(model: nn.Module, **cfg) -> DerppReplay:
    return DerppReplay(DerppConfig(**{"alpha": 1.0, "beta": 0.5, "buffer_size": 2, "replay_batch": 2, **cfg}),
                       _count_loss, CPU, "none", seed=0)


def test_derpp_terms_match_hand_values():
    model = Gain(2.0)
    replay = _derpp(model)
    first = _pixels(255, 51)  # 1.0 and 0.2: logits 2 and 0.4 when stored
    assert replay.losses(model, first, [_target(1), _target(2)], model(first)) == {}  # nothing to replay yet
    assert replay.count == 2 and torch.equal(replay.images[:, 0, 0, 0], torch.tensor([255, 51], dtype=torch.uint8))
    with torch.no_grad():
        model.w.fill_(3.0)  # logits now 3 and 0.6
    batch = _pixels(102)
    terms = replay.losses(model, batch, [_target(0)], model(batch))
    assert terms["loss_derpp_logits"].item() == pytest.approx(1.0 * (1.0 ** 2 + 0.2 ** 2) / 2)  # alpha x MSE
    assert terms["loss_derpp_labels"].item() == pytest.approx(0.5 * ((3.0 + 0.6) / 2 + 3))  # beta x loss(1 + 2 boxes)
    assert replay.count == 2 and replay.seen == 3
    terms["loss_derpp_logits"].backward()
    # d/dw mean((w x_i - s_i)^2) over the 3 channels of both = (2 x 1 x 1 + 2 x 0.2 x 0.2) / 2
    assert model.w.grad.item() == pytest.approx((2 * 1.0 + 2 * 0.2 * 0.2) / 2)


def test_derpp_reservoir_keeps_a_uniform_sample():
    model = Gain(1.0)
    replay = _derpp(model, alpha=0.0, beta=0.0, buffer_size=20)
    for value in range(200):  # offered one by one; each kept with probability 20 / seen
        batch = _pixels(value)
        replay.losses(model, batch, [_target(1)], model(batch))
    kept = sorted(replay.images[:, 0, 0, 0].tolist())
    assert replay.count == 20 and replay.seen == 200 and len(set(kept)) == 20
    early = sum(v < 100 for v in kept)
    assert 5 <= early <= 15, kept  # about half from each half of the stream (not just the newest)


def test_derpp_state_round_trip_replays_the_same_samples():
    model = Gain(1.0)
    replay = _derpp(model, buffer_size=3, replay_batch=2)
    for values in ((10, 20), (30, 40), (50, 60)):
        batch = _pixels(*values)
        replay.losses(model, batch, [_target(1), _target(2)], model(batch))
    resumed = _derpp(model, buffer_size=3, replay_batch=2)
    resumed.load_state_dict(replay.state_dict())
    batch = _pixels(70, 80)
    for _ in range(3):
        ours = replay.losses(model, batch, [_target(1), _target(3)], model(batch))
        theirs = resumed.losses(model, batch, [_target(1), _target(3)], model(batch))
        assert {k: v.item() for k, v in ours.items()} == {k: v.item() for k, v in theirs.items()}
    assert torch.equal(replay.images, resumed.images) and replay.seen == resumed.seen == 12
    assert [len(b) for b in replay.boxes] == [len(b) for b in resumed.boxes]
