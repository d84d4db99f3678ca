"""Test-time training (robustness/ttt): what adapts, reset modes, guards, settings."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

from detpact.config import ModelConfig, PostprocessConfig
from detpact.errors import DetpactError
from detpact.models.detector import build_model
from detpact.models.mim import MIMObjective, batch_statistics_only
from detpact.robustness.ttt import Guards, TTTBackend, add_ttt_arguments, preset_settings, ttt_settings
from detpact.robustness.ttt.adapt import NORM_TYPES, BlendedBatchNorm, configure_norms

CPU = torch.device("cpu")
POST = PostprocessConfig(score_threshold=0.0, max_det=20)


def tiny_model(mim: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"backbone": {"args": {"width_mult": 0.0625, "depth_mult": 0.33}},
                                      "head": {"reg_max": 4}, "mim_decoder": mim})
    model = build_model(cfg, 3)
    model.train()
    with torch.no_grad():  # settle the BatchNorm statistics as training would, then evaluate
        for _ in range(3):
            model(torch.rand(4, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """One tiny detector for the module: every TTT backend adapts its own copy."""
    return tiny_model()


def images(seed: int, count: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def backend(model: torch.nn.Module, **changes) -> TTTBackend:
    # Confidence 0: every candidate counts, so that an untrained model has something to adapt on.
    settings = preset_settings("custom", **{"confidence": 0.0, "lr": 0.05, "steps": 1, "batch_size": 2, **changes})
    return TTTBackend(model, settings, POST, CPU, "none", False)


def norm_affine_names(model: torch.nn.Module) -> set[str]:
    return {f"{name}.{kind}" for name, layer in model.named_modules() if isinstance(layer, NORM_TYPES)
            for kind in ("weight", "bias")}


def as_lists(dets) -> list:
    return [(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()) for d in dets]


def test_tent_changes_only_the_norm_affine_parameters_of_a_copy(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ttt = backend(model)
    ttt(images(1))
    assert ttt.report.steps == 1 and ttt.report.adapted_batches == 1
    params = dict(ttt.model.named_parameters())
    changed = {name for name, value in before.items() if name in params and not torch.equal(params[name], value)}
    assert changed, "Tent changed nothing"
    assert changed <= norm_affine_names(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the loaded model is untouched


def test_sample_reset_repeats_exactly_and_stream_carries_on(model):
    batches = [images(1), images(2)]
    sample = backend(model, reset="sample")
    first = [as_lists(sample(b)) for b in batches]
    again = [as_lists(sample(b)) for b in batches]
    assert first == again
    assert as_lists(backend(model, reset="sample")(batches[1])) == first[1]  # nor on what came before
    stream = backend(model, reset="stream")
    streamed = [as_lists(stream(b)) for b in batches]
    assert streamed[0] == first[0]  # the same start
    assert [as_lists(stream(b)) for b in batches] != streamed  # the adapted weights carry on


def test_max_batches_adapts_only_the_first_batches(model):
    ttt = backend(model, reset="stream", max_batches=1)
    for seed in range(3):
        ttt(images(seed))
    assert (ttt.report.batches, ttt.report.adapted_batches, ttt.report.steps) == (3, 1, 1)


def test_the_drift_guard_resets_to_the_loaded_weights(model):
    ttt = backend(model, guards=Guards(max_drift=1e-6))
    ttt(images(1))
    assert ttt.report.guards == {"drift_reset": 1, "rollback": 0, "entropy_stop": 0}
    assert all(torch.equal(p, ttt.original[name]) for name, p in ttt.params.items())


class ScriptedLoss(TTTBackend):
    """A TTT backend whose adaptation loss follows a script: a constructed rise."""

    def __init__(self, *args, losses: list[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = iter(losses)

    def _objective(self, x, number):
        total = sum(p.sum() for p in self.params.values())  # a real gradient, the scripted value
        return total - total.detach() + next(self.losses)


def test_the_rollback_guard_undoes_a_step_that_raised_the_loss(model):
    settings = preset_settings("custom", steps=3, batch_size=2, guards=Guards(rollback=True))
    ttt = ScriptedLoss(model, settings, POST, CPU, "none", False, losses=[1.0, 2.0, 0.5])
    start = {name: p.clone() for name, p in ttt.params.items()}
    ttt(images(1))
    # The first step (loss 1.0) was taken, the second forward found 2.0: that step is undone.
    assert ttt.report.guards["rollback"] == 1 and ttt.report.steps == 1
    assert all(torch.equal(p, start[name]) for name, p in ttt.params.items())
    unguarded = ScriptedLoss(model, replace(settings, guards=Guards()), POST, CPU, "none", False,
                             losses=[1.0, 2.0, 0.5])
    unguarded(images(1))
    assert unguarded.report.guards["rollback"] == 0 and unguarded.report.steps == 3


def test_the_entropy_guard_undoes_the_batch_and_stops_a_stream(model):
    plain = backend(model, max_batches=0)  # the unadapted predictions (test-batch statistics)
    expected = as_lists(plain(images(1)))
    ttt = backend(model, reset="stream", guards=Guards(entropy_floor=1.0))  # above ln 2: every batch collapses
    assert as_lists(ttt(images(1))) == expected
    ttt(images(2))
    assert ttt.report.guards["entropy_stop"] == 1 and ttt.report.stopped
    assert ttt.report.adapted_batches == 1  # stopped after the first


def test_mim_safe_needs_a_decoder_and_adapts_only_backbone_norms(model):
    with pytest.raises(DetpactError, match="mim_decoder"):
        TTTBackend(model, preset_settings("mim_safe"), POST, CPU, "none", False)
    ttt = TTTBackend(tiny_model(mim=True), preset_settings("mim_safe", lr=0.05, batch_size=2, guards=Guards()), POST, CPU,
                     "none", False)
    assert ttt.params and all(name.startswith("backbone.") for name in ttt.params)
    ttt(images(1))
    assert any(not torch.equal(p, ttt.original[n]) for n, p in ttt.params.items())


def test_the_mim_loss_in_training_masks_deterministically_and_keeps_running_statistics(model):
    mim = tiny_model(mim=True).train()
    pixels = torch.rand(2, 3, 32, 32)
    stats = {k: v.clone() for k, v in mim.state_dict().items() if "running" in k or "num_batches" in k}
    objective = MIMObjective(0.5, seed=3)
    first, again = objective.loss(mim, pixels, 7, 1), objective.loss(mim, pixels, 7, 1)
    assert torch.equal(first, again) and not torch.equal(first, objective.loss(mim, pixels, 8, 1))
    assert all(torch.equal(mim.state_dict()[k], v) for k, v in stats.items())  # the masked forward moved nothing
    first.backward()
    assert mim.mim_decoder.out.weight.grad is not None and mim.backbone.stem[0].weight.grad is not None
    with pytest.raises(RuntimeError), batch_statistics_only(mim):  # restored even when the block raises
        raise RuntimeError
    assert all(torch.equal(mim.state_dict()[k], v) for k, v in stats.items())
    assert not any(k.startswith("mim_decoder.") for k in model.state_dict())  # off: the detector is as before


def test_blended_batchnorm_keeps_training_statistics_for_a_familiar_batch_and_takes_a_shifted_ones():
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    noise = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    noise = (noise - noise.mean((0, 2, 3), keepdim=True)) / noise.std((0, 2, 3), unbiased=False, keepdim=True)
    familiar = noise * bn.running_var.sqrt().view(1, 3, 1, 1) + bn.running_mean.view(1, 3, 1, 1)  # exactly its statistics
    shifted = familiar * 3 + 5
    blended = BlendedBatchNorm(bn, shift_scale=0.03)
    torch.testing.assert_close(blended(familiar), bn(familiar), atol=1e-5, rtol=1e-5)  # w = 1: the training statistics
    assert float(blended.last_weight) == pytest.approx(1.0)
    batch_stats = torch.nn.functional.batch_norm(shifted, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(blended(shifted), batch_stats, atol=1e-4, rtol=1e-4)  # w ~ 0: the batch's
    assert float(blended.last_weight) < 1e-6
    between = (familiar * 1.05).requires_grad_()
    out = blended(between)
    assert 0.05 < float(blended.last_weight) < 0.95
    with torch.no_grad():  # the fused path (prediction, or an input needing no gradient): the same values
        torch.testing.assert_close(blended(between), out, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None  # the layer's own Parameters adapt
    assert between.grad.abs().sum() > 0  # and the gradient flows through the batch statistics


def test_norm_stats_test_uses_the_batch_statistics_alone(model):
    for stats in ("blend", "test"):
        ttt = backend(model, norm_stats=stats)
        blended = [m for m in ttt.model.modules() if isinstance(m, BlendedBatchNorm)]
        plain = [m for m in ttt.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert (blended and not plain) if stats == "blend" else (plain and not blended)
        assert all(m.running_mean is None for m in plain)
        assert set(ttt.params) == norm_affine_names(model)  # the same parameters adapt either way
    assert configure_norms(tiny_model(), torch.nn.Identity()) == {}  # nothing in scope, nothing adapts


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ttt_arguments(parser)
    return parser.parse_args(argv)


def test_ttt_flags():
    assert ttt_settings(parse()) is None
    safe = ttt_settings(parse("--ttt"))
    assert (safe.method, safe.reset, safe.guards) == ("tent", "sample", preset_settings("safe").guards)
    custom = ttt_settings(parse("--ttt", "--ttt-preset", "custom", "--ttt-guards", "rollback", "--ttt-steps", "3"))
    assert custom.guards == Guards(rollback=True) and custom.steps == 3
    assert ttt_settings(parse("--ttt", "--ttt-preset", "custom")).guards == Guards()
    assert safe.norm_stats == "blend" and ttt_settings(parse("--ttt", "--ttt-norm-stats", "test")).norm_stats == "test"
    for argv, message in ((("--ttt-lr", "0.1"), "only applies with --ttt"),
                          (("--ttt", "--ttt-guards", "drift"), "custom"),
                          (("--ttt", "--ttt-preset", "custom", "--ttt-guards", "speed"), "speed"),
                          (("--ttt", "--ttt-batch-size", "0"), "at least 1")):
        with pytest.raises(DetpactError, match=message):
            ttt_settings(parse(*argv))
