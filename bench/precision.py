"""Training speed at bf16 autocast + channels_last versus plain fp32, on the quickstart model.

The two variants alternate in blocks of steps in one process after warm-up (this
machine is noisy); the ratio is the median over blocks. Each variant has its own model
and optimizer, trained on the same batches.

    .venv/bin/python bench/precision.py [--blocks 6] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from alternating import timed, training_batches

from detpact.commands.runs import cache_dir
from detpact.config import load_config
from detpact.data.build import build_datasets
from detpact.engine.evaluate import prepare_images
from detpact.engine.runtime import autocast
from detpact.models.detector import build_model
from detpact.models.losses import build_criterion

REPO = Path(__file__).resolve().parents[1]


def make_variant(cfg, num_classes: int, amp: str, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.optimizer.lr)
    criterion = build_criterion(cfg.model.head)
    device = torch.device("cpu")

    def step(images, targets) -> None:
        with autocast(device, amp):
            outputs = model(prepare_images(images, device, channels_last))
        loss = criterion(outputs, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=6, help="timed blocks per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    data = build_datasets(cfg.data, cache_dir(None))
    batches = training_batches(cfg, data, args.steps)
    variants = {"fp32": make_variant(cfg, len(data.class_names), "none", False),
                "bf16+channels_last": make_variant(cfg, len(data.class_names), "bf16", True)}
    times = timed(variants, batches, args.blocks)
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16+channels_last"])]
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1000:.1f} ms/step")
    print(f"speed-up of bf16+channels_last over fp32: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.blocks} blocks of {args.steps} steps, "
          f"{cfg.data.image_size} px, batch {cfg.train.batch_size}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
