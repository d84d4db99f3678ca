"""Checkpoint cost: one checkpoint write versus one training step, on the quickstart model.

A save is timed exactly as `fit()` does it: the non-finite weight check, the bundle
(model, optimizer, EMA, RNG, sampler, config, ...) and `commit_checkpoint` (fsynced
last.pt, rotation of the previous one to last.prev.pt, a copy to best.pt when
validation improved, and manifest.json with every artifact's sha256). It goes into a
temporary run folder that already holds a previous last.pt, a best.pt and real metric
logs, as at any epoch end after the first. Steps are `train_step` at the config's
precision (quickstart: batch 16, 192 px, bf16 autocast + channels_last).

After warm-up, each repeat times K steps, then one save with best=False and one with
best=True, in one process; the figures are medians over repeats, because this machine
is shared and noisy (+-20 % between processes). The share of wall time is for the
default cadence (a save at each epoch end, assumed to write best.pt every time), and
with --every-steps N also for a save every N steps within the epoch.

    .venv/bin/python bench/checkpoint.py [--steps 10] [--repeats 5] [--every-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from detpact.commands.runs import cache_dir
from detpact.config import dump_config_yaml, load_config
from detpact.data.build import build_datasets
from detpact.engine.loop import _build_loaders, _build_step_parts
from detpact.engine.optim import lr_at
from detpact.engine.plan import plan_training
from detpact.engine.runtime import resolve_device, setup_determinism
from detpact.engine.state import Best, Progress, make_bundle
from detpact.engine.step import train_step
from detpact.run.checkpoint import commit_checkpoint
from detpact.run.contract import RunDir

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def epochs_of_batches(loader, sampler):
    """Training batches, epoch after epoch (a long benchmark may cross an epoch end)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def log_step(run: RunDir, step: int, stats: dict | None) -> None:
    """A train_metrics.jsonl line shaped like the Recorder's, so the metric logs grow as in a run."""
    record = {"step": step, "epoch": 0, "lr": 0.002, **(stats or {}), "skipped": False, "samples_per_s": 100.0,
              "time_s": float(step)}
    with run.train_metrics.open("a") as handle:
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")


def share(step_s: float, steps: int, save_s: float) -> float:
    """Fraction of wall time spent saving when `save_s` is spent per `steps` steps."""
    return save_s / (steps * step_s + save_s)


def spread(values: list[float], scale: float, fmt: str) -> str:
    return f"{statistics.median(values) * scale:{fmt}} (min {min(values) * scale:{fmt}}, max {max(values) * scale:{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every-steps", type=int, default=None, help="also model a save every N steps")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.config)
    setup_determinism(cfg.run.seed, cfg.run.deterministic, cfg.run.num_threads)
    device = resolve_device(cfg.run.device)
    data = build_datasets(cfg.data, cache_dir(None))
    loader, _, _, sampler = _build_loaders(cfg, data)
    tcfg = cfg.train
    plan = plan_training(tcfg, len(data.train))
    steps_per_epoch = plan.steps_per_epoch
    total_steps = tcfg.epochs * steps_per_epoch
    batches = epochs_of_batches(loader, sampler)
    progress, best = Progress(), Best(value=0.1, step=0, epoch=0, map50_95=0.1)

    with tempfile.TemporaryDirectory() as root:
        run = RunDir(Path(root))
        run.create()
        parts = _build_step_parts(cfg, device, len(data.class_names), str(run.last_ckpt), total_steps,
                                  micro_batches=plan.micro_batches)
        run.config_resolved.write_text(dump_config_yaml(cfg))
        run.val_metrics.write_text(json.dumps({"step": 0, "epoch": 0, "map50_95": 0.1, "map50": 0.2}) + "\n")

        def steps(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                step = progress.global_step + 1
                stats = train_step(parts, batches, lr_at(progress.global_step, total_steps, tcfg.optimizer.lr,
                                                         tcfg.scheduler, steps_per_epoch), step)
                progress.global_step, progress.samples_seen = step, progress.samples_seen + tcfg.batch_size
                log_step(run, step, stats)  # as the Recorder does; well under 1 ms
            return (time.perf_counter() - started) / count

        def save(improved: bool) -> float:  # as fit()'s save()
            started = time.perf_counter()
            parts.guard.check_weights(progress.global_step, parts.model, parts.ema.module if parts.ema else None)
            bundle = make_bundle(cfg, data, run, parts, progress, sampler, best, plan)
            commit_checkpoint(run, bundle, best=improved)
            return time.perf_counter() - started

        steps(WARMUP)
        save(True)  # untimed: from here on every save rotates last.pt and finds a best.pt, as in a run
        print(f"model width {cfg.model.backbone.args['width_mult']}, {cfg.data.image_size} px, batch "
              f"{tcfg.batch_size}, amp {cfg.run.amp}, channels_last {cfg.run.channels_last}, "
              f"{steps_per_epoch} steps per epoch; {args.steps} timed steps per repeat after {WARMUP} warm-up; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work skews every figure)")
        step_s, last_s, best_s = [], [], []
        for repeat in range(args.repeats):
            step_s.append(steps(args.steps))
            last_s.append(save(False))
            best_s.append(save(True))
            print(f"repeat {repeat + 1}: step {step_s[-1] * 1000:.1f} ms, checkpoint {last_s[-1] * 1000:.1f} ms, "
                  f"with best.pt {best_s[-1] * 1000:.1f} ms")
        size_mb = run.last_ckpt.stat().st_size / 1e6
        assert run.prev_ckpt.is_file() and run.best_ckpt.is_file()

    reps = range(args.repeats)
    print(f"seconds per step:                  {spread(step_s, 1, '.4f')}")
    print(f"seconds per checkpoint:            {spread(last_s, 1, '.4f')}")
    print(f"seconds per checkpoint + best.pt:  {spread(best_s, 1, '.4f')}")
    print(f"checkpoint / step ratio:           {spread([last_s[i] / step_s[i] for i in reps], 1, '.2f')}")
    print(f"checkpoint + best.pt / step ratio: {spread([best_s[i] / step_s[i] for i in reps], 1, '.2f')}")
    print(f"checkpoint size: {size_mb:.1f} MB")
    default = [share(step_s[i], steps_per_epoch, best_s[i]) for i in reps]
    if args.every_steps:
        # Saves every N steps within an epoch (last.pt only), then the epoch-end save with best.pt.
        mid = (steps_per_epoch - 1) // args.every_steps
        custom = [(mid * last_s[i] + best_s[i]) / (steps_per_epoch * step_s[i] + mid * last_s[i] + best_s[i])
                  for i in reps]
        print(f"share of wall time with a save every {args.every_steps} steps: {spread(custom, 100, '.2f')} %")
    print(f"share of wall time at the default cadence (every epoch, best.pt each time): {spread(default, 100, '.2f')} %")
    print(f"checkpoint share of wall time at the default cadence: {statistics.median(default) * 100:.1f} % "
          "(target <= 2 %)")


if __name__ == "__main__":
    main()
