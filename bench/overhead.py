"""Harness overhead: detpact's training loop versus a bare PyTorch loop.

Both variants train the quickstart model on the quickstart data (synthetic shapes,
192 px, batch 16, bf16 autocast + channels_last, AdamW, grad clipping and EMA, 2
batches accumulated per optimizer step) with the same DataLoader. The bare loop is just
(forward / loss / backward) x accumulate / clip / step / EMA. detpact's loop is the real `fit()`, with everything a user gets per step: the
metrics JSONL line, status.json, the progress bar, the non-finite guard and the LR
schedule. Its step time is read from its own per-step log (validation and the final
checkpoint are not steps; bench/checkpoint.py will cover checkpoint cost).

The variants alternate in one process after warm-up; the ratio is the median over
repeats, because this machine is shared and noisy (+-20 % between processes).

    .venv/bin/python bench/overhead.py [--steps 30] [--repeats 5] [--accumulate 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detpact.commands.runs import cache_dir
from detpact.config import load_config
from detpact.data.build import build_datasets
from detpact.engine.evaluate import prepare_images
from detpact.engine.loop import _build_loaders, _build_step_parts, fit
from detpact.engine.optim import lr_at
from detpact.engine.runtime import autocast, resolve_device, setup_determinism
from detpact.run.contract import RunDir

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5


def bare_loop(cfg, data, device, steps: int, accumulate: int) -> float:
    """Seconds per step of a plain loop over the same components (`accumulate` batches a step)."""
    setup_determinism(cfg.run.seed, cfg.run.deterministic, cfg.run.num_threads)
    loader, _, _, sampler = _build_loaders(cfg, data)
    parts = _build_step_parts(cfg, device, len(data.class_names), "unused", WARMUP + steps)
    model, optimizer, ema = parts.model, parts.optimizer, parts.ema
    sampler.set_epoch(0)
    batches = iter(loader)
    total = WARMUP + steps
    for step in range(total):
        if step == WARMUP:
            started = time.perf_counter()
        for group in optimizer.param_groups:  # the same schedule as fit(): speed can depend on the weights
            group["lr"] = lr_at(step, total, cfg.train.optimizer.lr, cfg.train.scheduler, len(loader) // accumulate)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            images, targets = next(batches)
            with autocast(device, cfg.run.amp):
                outputs = model(prepare_images(images, device, cfg.run.channels_last))
            loss = parts.criterion(outputs, targets)["loss"] / accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        optimizer.step()
        ema.update(model)
    return (time.perf_counter() - started) / steps


def detpact_loop(cfg, data, device, steps: int, root: Path) -> float:
    """Seconds per step of `fit()`, from its own per-step log (warm-up excluded)."""
    setup_determinism(cfg.run.seed, cfg.run.deterministic, cfg.run.num_threads)
    run = RunDir(Path(tempfile.mkdtemp(dir=root)))
    run.create()
    fit(cfg, run, data, device, resume=None)
    times = [json.loads(line)["time_s"] for line in run.train_metrics.read_text().splitlines()]
    return (times[WARMUP + steps - 1] - times[WARMUP - 1]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=2, help="batches accumulated per optimizer step (both loops)")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.config, [f"train.max_steps={WARMUP + args.steps}", "export.onnx=false",
                                     "train.checkpoint.every_epochs=null", "train.nominal_batch=null",
                                     f"train.accumulate={args.accumulate}"])
    device = resolve_device(cfg.run.device)
    data = build_datasets(cfg.data, cache_dir(None))
    print(f"backbone {cfg.model.backbone.name}, {cfg.data.image_size} px, batch "
          f"{cfg.train.batch_size}, amp {cfg.run.amp}, channels_last {cfg.run.channels_last}, "
          f"{torch.get_num_threads()} threads, {args.accumulate} batches accumulated per step, EMA "
          f"{cfg.train.ema.enabled}, {args.steps} timed steps after {WARMUP} warm-up")
    ratios = []
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            bare = bare_loop(cfg, data, device, args.steps, args.accumulate)
            ours = detpact_loop(cfg, data, device, args.steps, Path(root))
            ratios.append(ours / bare)
            print(f"repeat {repeat + 1}: bare {bare * 1000:.1f} ms/step, detpact {ours * 1000:.1f} ms/step, "
                  f"ratio {ours / bare:.3f}")
    print(f"detpact/bare step-time ratio: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats); target <= 1.05")


if __name__ == "__main__":
    main()
