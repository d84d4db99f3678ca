"""LR schedule, EMA, non-finite guard and the train step's skip path."""

from __future__ import annotations

import math

import pytest
import torch

from detpact.config import EMAConfig, HeadConfig, ModelConfig, OptimizerConfig, SchedulerConfig
from detpact.engine.ema import ModelEMA
from detpact.engine.guards import NonFiniteGuard
from detpact.engine.optim import build_optimizer, describe_groups, lr_at, set_lr, warmup_length
from detpact.engine.step import StepParts, train_step
from detpact.errors import TrainingAborted
from detpact.models.detector import build_model
from detpact.models.losses import build_criterion
from detpact.run.weights import freeze_batchnorm


def test_lr_warmup_then_cosine_to_floor():
    cfg = SchedulerConfig(warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, 1.0, cfg, 10) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising warm-up
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lr_at(100, 100, 1.0, cfg, 10) == pytest.approx(0.1)
    assert lr_at(37, 100, 1.0, cfg, 10) == lr_at(37, 100, 1.0, cfg, 10)  # pure: same step, same value
    assert lr_at(0, 1, 1.0, cfg, 1) > 0  # a one-step run still trains


def test_each_schedule_against_hand_computed_values():
    def lr(name: str, step: int, **kw) -> float:
        return lr_at(step, 100, 2.0, SchedulerConfig(name=name, warmup_steps=9, min_lr_ratio=0.1, **kw), 10)

    # Linear warm-up over 9 steps from warmup_init x lr: step s reaches (s + 1) / 10 of the way.
    assert lr("none", 0) == pytest.approx(0.2) and lr("none", 4) == pytest.approx(1.0)
    assert lr("none", 0, warmup_init=0.5) == pytest.approx(2.0 * (0.5 + 0.5 * 0.1))
    assert lr("none", 9) == lr("none", 99) == 2.0
    # After it, progress p = (step - 9) / 91: linear 2.0 -> 0.2, cosine likewise.
    assert lr("linear", 9) == pytest.approx(2.0) and lr("linear", 100) == pytest.approx(0.2)
    assert lr("linear", 54) == pytest.approx(0.2 + 1.8 * (1 - 45 / 91))
    assert lr("cosine", 54) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * 45 / 91)))
    # multistep: x gamma from each milestone on.
    ms = {"milestones": [50, 80], "gamma": 0.5}
    assert [lr("multistep", s, **ms) for s in (9, 49, 50, 79, 80, 99)] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    # onecycle: a half-cosine rise from warmup_init x lr, then cosine decay.
    assert lr("onecycle", 4, warmup_init=0.04) == pytest.approx(2.0 * (0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi / 2))))
    assert lr("onecycle", 54) == lr("cosine", 54)
    auto = SchedulerConfig(name="onecycle")
    assert warmup_length(auto, total_steps=1000, steps_per_epoch=10) == 300  # torch's pct_start 0.3
    with pytest.raises(ValueError, match="milestones is required"):
        SchedulerConfig(name="multistep")
    with pytest.raises(ValueError, match="increasing"):
        SchedulerConfig(name="multistep", milestones=[5, 3])


def test_default_warmup_is_three_epochs_at_most_a_tenth_of_the_run():
    auto = SchedulerConfig()
    assert warmup_length(auto, total_steps=1000, steps_per_epoch=10) == 30
    assert warmup_length(auto, total_steps=108, steps_per_epoch=3) == 9
    assert warmup_length(auto, total_steps=500, steps_per_epoch=125) == 50  # a tenth of a 4-epoch run
    assert warmup_length(SchedulerConfig(warmup_steps=200), total_steps=50, steps_per_epoch=5) == 49


def test_optimizer_groups_decay_only_weights():
    model = build_model(ModelConfig(), 3)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.05))
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"]
    assert [g["weight_decay"] for g in groups.values()] == [0.05, 0.0, 0.05, 0.0]
    for name, group in groups.items():
        assert all((p.ndim >= 2) == name.endswith("/decay") for p in group["params"]), name
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    backbone = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone for g in opt.param_groups if g["name"].startswith("backbone") for p in g["params"])


def test_exclusion_switches_and_part_multipliers():
    model = build_model(ModelConfig.model_validate(
        {"backbone": {"name": "tiny_cnn", "args": {"width": 8}}, "head": {"name": "rtdetr", "rtdetr": {
            "num_queries": 10, "num_decoder_layers": 1, "num_heads": 2, "dim_feedforward": 32, "encoder_ffn": 32}},
         "projector": {"d_model": 16}}), 3)
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = OptimizerConfig(weight_decay=0.1, wd_exclude_norm=False, backbone_lr_mult=0.1, backbone_wd_mult=0.5,
                          head_wd_mult=2.0)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert (groups["backbone/decay"]["lr_mult"], groups["backbone/decay"]["weight_decay"]) == (0.1, 0.05)
    assert (groups["head/decay"]["lr_mult"], groups["head/decay"]["weight_decay"]) == (1.0, 0.2)
    # wd_exclude_norm off: batch- and layer-norm weights decay; their biases still do not.
    decayed = {names[id(p)] for g in opt.param_groups if g["name"].endswith("/decay") for p in g["params"]}
    assert "backbone.stem.1.weight" in decayed and "head.decoder.0.norms.0.weight" in decayed
    assert not any(name.endswith("bias") for name in decayed)
    no_bias_exclusion = build_optimizer(model, OptimizerConfig(wd_exclude_bias=False))
    decayed = {names[id(p)] for g in no_bias_exclusion.param_groups if g["name"].endswith("/decay")
               for p in g["params"]}
    assert "head.decoder.0.self_attn.in_proj_bias" in decayed and "backbone.stem.1.weight" not in decayed

    set_lr(opt, 0.01)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["backbone/decay"] == pytest.approx(0.001)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["head/no_decay"] == 0.01
    assert [g["name"] for g in describe_groups(opt)] == list(groups)
    assert sum(g["params"] for g in describe_groups(opt)) == sum(p.numel() for p in model.parameters())


def test_sgd_with_nesterov_momentum():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, momentum=0.8, nesterov=True))
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in opt.param_groups)
    with pytest.raises(ValueError, match="nesterov needs a momentum"):
        OptimizerConfig(name="sgd", momentum=0.0, nesterov=True)


def test_ema_ramp_update_and_state_round_trip():
    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, EMAConfig(decay=0.9, warmup_steps=10), 100)
    assert ema.current_decay() == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 10))
    assert ema.current_decay() == pytest.approx(d)
    expected = d * (model.weight - 1.0) + (1 - d) * model.weight
    torch.testing.assert_close(ema.module.weight, expected)
    clone = ModelEMA(torch.nn.Linear(2, 1), EMAConfig(decay=0.9, warmup_steps=10), 100)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 1
    torch.testing.assert_close(clone.module.weight, ema.module.weight)


@pytest.mark.parametrize("average", [False, True])
def test_ema_copies_or_averages_batchnorm_statistics(average):
    model = torch.nn.BatchNorm2d(3)
    ema = ModelEMA(model, EMAConfig(decay=0.9, warmup_steps=1, average_buffers=average), 100)
    model.train()(torch.randn(4, 3, 5, 5) * 3 + 2)  # moves the running statistics, counts a batch
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1)) if average else 0.0
    torch.testing.assert_close(ema.module.running_mean, (1 - d) * model.running_mean)  # from 0
    torch.testing.assert_close(ema.module.running_var, d * 1.0 + (1 - d) * model.running_var)  # from 1
    assert ema.module.num_batches_tracked.item() == 1  # a counter: always copied


def test_guard_aborts_after_consecutive_failures_only():
    guard = NonFiniteGuard(max_consecutive=3, last_good_checkpoint="runs/x/checkpoints/last.pt")
    for ok in (False, False, True, False, False):
        guard.record(ok)
        guard.check(step=1)
    assert guard.skipped == 4 and guard.consecutive == 2
    guard.record(False)
    with pytest.raises(TrainingAborted, match="runs/x/checkpoints/last.pt") as err:
        guard.check(step=9)
    assert err.value.exit_code == 3 and "step 9" in err.value.message


def make_parts(criterion):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"backbone": {"args": {"width_mult": 0.0625}}})
    model = build_model(cfg, 2).train()
    return StepParts(
        model=model, criterion=criterion, optimizer=build_optimizer(model, OptimizerConfig()),
        ema=ModelEMA(model, EMAConfig(), 100), scaler=None, guard=NonFiniteGuard(3, "last.pt"),
        device=torch.device("cpu"), amp="bf16", channels_last=False, grad_clip=10.0, accumulate=2,
    )


def batches(n):
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    for _ in range(n):
        yield torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), [target, target]


def test_train_step_updates_weights_and_ema():
    parts = make_parts(build_criterion(HeadConfig()))
    before = [p.detach().clone() for p in parts.model.parameters()]
    stats = train_step(parts, batches(2), lr=1e-3, step=1)
    assert stats is not None and math.isfinite(stats["loss"]) and stats["images"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert parts.ema.updates == 1


def test_train_step_skips_non_finite_loss_and_keeps_data_order():
    real = build_criterion(HeadConfig())

    def nan_criterion(outputs, targets):
        losses = real(outputs, targets)
        return {**losses, "loss": losses["loss"] * float("nan")}

    parts = make_parts(nan_criterion)
    before = [p.detach().clone() for p in parts.model.parameters()]
    state_before = parts.optimizer.state_dict()["state"]
    source = batches(3)
    assert train_step(parts, source, lr=1e-3, step=1) is None
    assert all(torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert parts.ema.updates == 0 and state_before == parts.optimizer.state_dict()["state"] == {}
    # Both micro-batches of the skipped step were consumed: exactly one is left.
    assert len(list(source)) == 1


def _nan_loss(losses, outputs):
    return torch.tensor(float("nan"))


def _nan_gradient(losses, outputs):
    """A finite loss whose gradient is not: d sqrt(u)/du at u = 0 is infinite (times 0: NaN)."""
    return losses["loss"] + (outputs.boxes.float().sum() * 0).sqrt()


@pytest.mark.parametrize(("fault", "scale_after"), [(_nan_loss, 1.0), (_nan_gradient, 0.5)],
                         ids=["nan loss", "finite loss, nan gradient"])
def test_train_step_with_grad_scaler_skips_a_non_finite_step_and_changes_nothing(fault, scale_after):
    """fp16 runs use a GradScaler: a non-finite step is skipped, not a crash, and leaves the
    weights, the optimizer and the EMA as they were (RELIABILITY row 22). A NaN loss never
    reaches the scaler; a non-finite gradient is, to the scaler, an fp16 overflow: it halves
    its scale, as it must, or an overflowing run would skip every step from then on."""
    real = build_criterion(HeadConfig())

    def criterion(outputs, targets):
        losses = real(outputs, targets)
        return {**losses, "loss": fault(losses, outputs)}

    parts = make_parts(criterion)
    parts.scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in parts.model.parameters()]
    scaler_before = parts.scaler.state_dict()
    assert train_step(parts, batches(2), lr=1e-3, step=1) is None
    assert all(torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert parts.optimizer.state_dict()["state"] == {} and parts.ema.updates == 0
    assert parts.scaler.state_dict() == {**scaler_before, "scale": scaler_before["scale"] * scale_after}
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in parts.model.parameters())
    parts.criterion = real
    assert train_step(parts, batches(2), lr=1e-3, step=1) is not None and parts.ema.updates == 1


def _mean_square_criterion(outputs, targets):
    """A loss that is a plain mean over the images (no per-batch normaliser)."""
    loss = outputs.cls_logits.float().pow(2).mean() + outputs.boxes.float().mean()
    return {"loss": loss, "num_pos": torch.tensor(0.0)}


def _gn_parts(batch_gen_accumulate: int, grad_clip: float | None = 10.0):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"backbone": {"norm": "gn", "args": {"width_mult": 0.125}}})
    model = build_model(cfg, 2).train()
    # GroupNorm in the backbone, frozen statistics in the neck and head: no layer mixes
    # the images of a batch, as in a model without batch norm.
    assert freeze_batchnorm(model) > 0
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    return StepParts(
        model=model, criterion=_mean_square_criterion,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0),
        ema=None, scaler=None, guard=NonFiniteGuard(3, "last.pt"), device=torch.device("cpu"), amp="none",
        channels_last=False, grad_clip=grad_clip, accumulate=batch_gen_accumulate,
    )


def test_accumulating_4_batches_of_2_equals_one_batch_of_8():
    torch.manual_seed(1)
    images = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 8
    accumulated, whole = _gn_parts(4), _gn_parts(1)
    train_step(accumulated, iter([(images[i:i + 2], targets[i:i + 2]) for i in range(0, 8, 2)]), lr=0.1, step=1)
    train_step(whole, iter([(images, targets)]), lr=0.1, step=1)
    moved = [(a - b).abs().max().item() for a, b in zip(accumulated.model.parameters(), whole.model.parameters())]
    start = _gn_parts(1).model.parameters()
    assert max(moved) < 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(whole.model.parameters(), start))  # the step did move them


def test_gradient_clipping_bounds_the_update_and_logs_the_raw_norm():
    parts = _gn_parts(1, grad_clip=1e-3)
    before = [p.detach().clone() for p in parts.model.parameters()]
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    stats = train_step(parts, iter([(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}] * 2)]),
                       lr=1.0, step=1)
    update = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(parts.model.parameters(), before)))
    assert stats["grad_norm"] > 1e-2  # the norm before clipping
    assert update.item() == pytest.approx(1e-3, rel=1e-3)  # plain SGD at lr 1: the update is the clipped gradient
