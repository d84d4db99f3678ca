"""Training-loader throughput versus what a training step consumes, on coco128 with augmentation.

The loader is the real training loader (`_build_loaders`: mosaic, zoom/shift, HSV,
flip, the config's `data.cache`), once with the config's `data.num_workers` (resolved:
"auto" is 0 on <= 2 cores) and once with 2 workers. The step is the real `train_step`
of the config's model at its precision (configs/coco128.yaml: the quickstart model,
bf16 autocast + channels_last) on batches drawn beforehand, so that it waits on nothing.

After warm-up the variants alternate in blocks in one process (this machine is noisy).
A loader block is one whole epoch (a fresh pass over a new epoch's order, read to the
end: a worker loader starts from an empty prefetch queue and leaves no work running
into the next block); a step block is K steps. The figures are medians over repeats;
the ratio is loader images/s over step images/s (target >= 2: with in-process loading,
loading then costs at most a third of the wall time).

    .venv/bin/python bench/loader.py [--image-size 640] [--steps 4] [--repeats 5] [--cache none|ram|disk]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detpact.commands.runs import cache_dir
from detpact.config import load_config
from detpact.data.build import build_datasets
from detpact.data.dataset import collate, make_loader, resolve_num_workers
from detpact.engine.loop import _build_loaders, _build_step_parts
from detpact.engine.runtime import resolve_device, setup_determinism
from detpact.engine.step import train_step

REPO = Path(__file__).resolve().parents[1]


def loader_block(loader, sampler, epoch: int) -> float:
    """Images per second over one whole pass over `epoch`."""
    sampler.set_epoch(epoch)
    started = time.perf_counter()
    images = sum(len(images) for images, _ in loader)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "coco128.yaml"))
    parser.add_argument("--image-size", type=int, default=None, help="override data.image_size")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", choices=("none", "ram", "disk"), default=None, help="override data.cache")
    args = parser.parse_args()

    overrides = [f"data.image_size={args.image_size}"] * bool(args.image_size) + [f"data.cache={args.cache}"] * bool(
        args.cache)
    cfg = load_config(args.config, overrides)
    setup_determinism(cfg.run.seed, cfg.run.deterministic, cfg.run.num_threads)
    device = resolve_device(cfg.run.device)
    data = build_datasets(cfg.data, cache_dir(None), progress=False)
    with tempfile.TemporaryDirectory() as loader_cache:
        default_loader, _, _, sampler = _build_loaders(cfg, data, Path(loader_cache))
        dataset = default_loader.dataset
        default_workers = resolve_num_workers(cfg.data.num_workers)
        loaders = {f"loader, {default_workers} workers (data.num_workers)": default_loader}
        if default_workers != 2:
            loaders["loader, 2 workers"] = make_loader(dataset, cfg.train.batch_size, 2, sampler, drop_last=True)

        parts = _build_step_parts(cfg, device, len(data.class_names), os.devnull, 1000)
        bs = cfg.train.batch_size
        step_batches = [collate([dataset[(0, (j * bs + i) % len(dataset))] for i in range(bs)]) for j in range(args.steps)]
        lr = cfg.train.optimizer.lr

        def step_block() -> float:
            started = time.perf_counter()
            batches = iter(step_batches)
            for step in range(len(step_batches)):
                train_step(parts, batches, lr, step + 1)
            return sum(len(images) for images, _ in step_batches) / (time.perf_counter() - started)

        step_block()  # warm-up: allocator, autocast caches, worker start-up
        for loader in loaders.values():
            loader_block(loader, sampler, 0)
        print(f"{cfg.data.image_size} px, batch {cfg.train.batch_size}, {len(dataset)} train images, augment "
              f"{cfg.data.augment.model_dump()}, cache {cfg.data.cache}; model width "
              f"{cfg.model.backbone.args['width_mult']}, amp {cfg.run.amp}, channels_last {cfg.run.channels_last}, "
              f"{torch.get_num_threads()} threads; loader blocks of one epoch, step blocks of {args.steps} steps, "
              f"{args.repeats} repeats; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        rates: dict[str, list[float]] = {name: [] for name in (*loaders, "training step")}
        for repeat in range(args.repeats):
            for name, loader in loaders.items():
                rates[name].append(loader_block(loader, sampler, repeat + 1))
            rates["training step"].append(step_block())
            print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items())
                  + " images/s")

    step = rates["training step"]
    for name in rates:
        print(f"{name:40s} median {statistics.median(rates[name]):7.1f} images/s "
              f"(min {min(rates[name]):.1f}, max {max(rates[name]):.1f})")
    for name in loaders:
        ratios = [a / b for a, b in zip(rates[name], step)]
        print(f"ratio {name} / training step: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 2)")


if __name__ == "__main__":
    main()
