"""Test-time training settings: the presets, the `--ttt*` flags and their checks.

Presets (docs/robustness.md, "Test-time training"):
  safe      Tent (entropy of confident predictions) with every guard on;
  mim_safe  masked-image reconstruction (needs model.mim_decoder) with every guard on;
  custom    --ttt-method and --ttt-guards as given (no guard unless named).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from detpact.errors import DetpactError

METHODS = ("tent", "mim")
RESETS = ("sample", "stream")
GUARD_NAMES = ("drift", "rollback", "entropy")
NORM_STATS = ("blend", "test")
# BlendedBatchNorm's scale (robustness/ttt/adapt.py): a layer whose test batch is at a mean
# symmetric KL divergence d from its training statistics keeps exp(-d / 0.03) of them. On
# the quickstart run clean batches sit at d ~ 0.001 in most layers (w ~ 0.97) and
# Gaussian noise of severity 5 at 0.02-0.3 (w 0.5 down to 0); docs/robustness.md has the sweep.
SHIFT_SCALE = 0.03


@dataclass(frozen=True)
class Guards:
    """The guard rails; each None / False is off.

    max_drift:     relative L2 distance ||theta - theta_0|| / ||theta_0|| of the adapted
                   parameters from the loaded ones above which they are reset to theta_0.
    rollback:      undo an adaptation step after which the adaptation loss rose.
    entropy_floor: when the mean entropy (nats) of the confident predictions of an adapted
                   batch falls below it, the batch's adaptation is undone and adaptation stops.
    """

    max_drift: float | None = None
    rollback: bool = False
    entropy_floor: float | None = None


# Every guard of the safe presets. A few optimizer steps of 1e-3 move the norm affine
# parameters by well under 1 % (relative L2): 5 % means adaptation has run away. The binary
# entropy of a score of 0.99 is 0.056 nats: confident predictions averaging above that
# are saturated, no longer informative.
SAFE_GUARDS = Guards(max_drift=0.05, rollback=True, entropy_floor=0.05)
PRESETS = {"safe": ("tent", SAFE_GUARDS), "mim_safe": ("mim", SAFE_GUARDS)}
PRESET_NAMES = (*PRESETS, "custom")


@dataclass(frozen=True)
class TTTSettings:
    """How a TTT backend adapts (robustness/ttt/backend.py).

    method:     tent | mim (the objective); preset: the preset it came from.
    reset:      sample = the loaded weights are restored before every batch (results do
                not depend on the order of batches); stream = adaptation carries on.
    batch_size: images per adaptation batch.
    max_batches: adapt on the first N batches only, then predict without adapting (None: all).
    lr, steps:  Adam's learning rate and the optimizer steps per batch.
    confidence: Tent's confident predictions are the candidates whose top class score is
                at least this (their entropy is minimised; the rest are left alone).
    norm_stats: the statistics BatchNorm layers normalise with: blend = the training ones
                blended with the test batch's by how far the batch has shifted
                (adapt.BlendedBatchNorm); test = the test batch's alone (Tent as published).
    """

    method: str = "tent"
    preset: str = "safe"
    reset: str = "sample"
    batch_size: int = 16
    max_batches: int | None = None
    lr: float = 1e-3
    steps: int = 1
    confidence: float = 0.5
    norm_stats: str = "blend"
    guards: Guards = field(default_factory=lambda: SAFE_GUARDS)
    seed: int = 0  # MIM's masks: drawn from (seed, batch number)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_settings(preset: str = "safe", **changes: Any) -> TTTSettings:
    """A preset's settings with `changes` (reset, batch_size, max_batches, lr, steps, ...), checked."""
    if preset not in PRESET_NAMES:
        raise DetpactError(f"Unknown --ttt-preset {preset!r}: choose one of {', '.join(PRESET_NAMES)}.")
    method, guards = PRESETS.get(preset, ("tent", Guards()))
    settings = replace(TTTSettings(method=method, preset=preset, guards=guards), **changes)
    check_settings(settings)
    return settings


def check_settings(settings: TTTSettings) -> None:
    if settings.method not in METHODS:
        raise DetpactError(f"Unknown --ttt-method {settings.method!r}: choose one of {', '.join(METHODS)}.")
    if settings.norm_stats not in NORM_STATS:
        raise DetpactError(f"Unknown --ttt-norm-stats {settings.norm_stats!r}: choose one of {', '.join(NORM_STATS)}.")
    if settings.reset not in RESETS:
        raise DetpactError(f"Unknown --ttt-reset {settings.reset!r}: choose one of {', '.join(RESETS)}.")
    if settings.batch_size < 1 or settings.steps < 1 or (settings.max_batches is not None and settings.max_batches < 0):
        raise DetpactError("--ttt-batch-size and --ttt-steps must be at least 1, --ttt-max-batches at least 0.")
    if not settings.lr > 0:
        raise DetpactError(f"--ttt-lr must be above 0, got {settings.lr}.")


def add_ttt_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ttt* flags of predict, eval and test."""
    group = parser.add_argument_group("test-time training (docs/robustness.md)")
    group.add_argument("--ttt", action="store_true",
                       help="adapt a copy of the model to the test images while predicting (the run's files are "
                            "never changed)")
    group.add_argument("--ttt-preset", choices=PRESET_NAMES,
                       help="safe: Tent with guard rails (default); mim_safe: masked-image reconstruction with "
                            "guard rails (needs model.mim_decoder); custom: --ttt-method and --ttt-guards as given")
    group.add_argument("--ttt-reset", choices=RESETS,
                       help="sample: restore the weights before every batch (default); stream: keep adapting")
    group.add_argument("--ttt-batch-size", type=int, metavar="N", help="images per adaptation batch (default 16)")
    group.add_argument("--ttt-max-batches", type=int, metavar="N",
                       help="adapt on the first N batches only, then predict without adapting (bounds the cost)")
    group.add_argument("--ttt-lr", type=float, metavar="LR", help="Adam learning rate (default 1e-3)")
    group.add_argument("--ttt-steps", type=int, metavar="N", help="optimizer steps per batch (default 1)")
    group.add_argument("--ttt-norm-stats", choices=NORM_STATS,
                       help="blend: BatchNorm blends the training statistics with the test batch's by how far the "
                            "batch has shifted (default); test: the test batch's alone")
    group.add_argument("--ttt-method", choices=METHODS, help="with --ttt-preset custom: the objective (default tent)")
    group.add_argument("--ttt-guards", metavar="LIST",
                       help=f"with --ttt-preset custom: guards to turn on, comma-separated ({','.join(GUARD_NAMES)}) "
                            "at the safe presets' thresholds, or none (default)")


def ttt_settings(args: argparse.Namespace) -> TTTSettings | None:
    """The settings the --ttt* flags give, or None without --ttt."""
    flags = {"preset": args.ttt_preset, "reset": args.ttt_reset, "batch_size": args.ttt_batch_size,
             "max_batches": args.ttt_max_batches, "lr": args.ttt_lr, "steps": args.ttt_steps,
             "norm_stats": args.ttt_norm_stats,
             "method": args.ttt_method, "guards": args.ttt_guards}
    given = {key: value for key, value in flags.items() if value is not None}
    if not args.ttt:
        if given:
            raise DetpactError(f"--ttt-{next(iter(given)).replace('_', '-')} only applies with --ttt.")
        return None
    preset = given.pop("preset", "safe")
    if preset != "custom" and ({"method", "guards"} & set(given)):
        raise DetpactError(f"--ttt-method and --ttt-guards only apply with --ttt-preset custom (the {preset} preset "
                           "fixes them).")
    if "guards" in given:
        given["guards"] = parse_guards(given["guards"])
    return preset_settings(preset, **given)


def parse_guards(text: str) -> Guards:
    """'drift,rollback' -> those guards at the safe presets' thresholds; 'none' -> no guard."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return Guards()
    unknown = [name for name in names if name not in GUARD_NAMES]
    if unknown or not names:
        raise DetpactError(f"--ttt-guards {text!r}: name guards among {', '.join(GUARD_NAMES)} (comma-separated), "
                           "or none.")
    return Guards(max_drift=SAFE_GUARDS.max_drift if "drift" in names else None, rollback="rollback" in names,
                  entropy_floor=SAFE_GUARDS.entropy_floor if "entropy" in names else None)
