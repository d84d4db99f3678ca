"""What train.quant: int8wo does to speed and memory, on the rtdetr quickstart model (CPU).

Two variants of the same model (same initial weights, same batches): float, and its
Linear layers int8 weight-only quantised by torchao (models/quant.py), both at the
config's bf16 autocast + channels_last. They alternate in blocks of training steps, then
of inference forwards, after warm-up (this machine is noisy); each ratio is the median
over blocks. Memory: the bytes of the weights the model computes with, and of what a
quantised run also keeps (the float base, in host memory, for its checkpoints).

    .venv/bin/python bench/quant.py [--blocks 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from alternating import timed, training_batches
from torch import nn

from detpact.commands.runs import cache_dir
from detpact.config import load_config
from detpact.data.build import build_datasets
from detpact.engine.evaluate import prepare_images
from detpact.engine.runtime import autocast
from detpact.models.detector import build_model
from detpact.models.losses import build_criterion
from detpact.models.quant import QuantisedLinear, apply_quant

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def make_variant(cfg, num_classes: int, quant: str) -> tuple[nn.Module, Callable, Callable]:
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes).to(memory_format=torch.channels_last)
    apply_quant(model, quant, required=True, device=CPU)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.optimizer.lr)
    criterion = build_criterion(cfg.model.head)

    def train_step(images, targets) -> None:
        model.train()
        with autocast(CPU, cfg.run.amp):
            outputs = model(prepare_images(images, CPU, True))
        loss = criterion(outputs, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def forward(images, _targets) -> None:
        model.eval()
        with autocast(CPU, cfg.run.amp):
            model(prepare_images(images, CPU, True))

    return model, train_step, forward


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the weights computed with, bytes of the float bases kept besides)."""
    used = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    bases = 0
    for module in model.modules():
        if isinstance(module, QuantisedLinear):
            q = module.qweight
            used += q.qdata.numel() * q.qdata.element_size() + q.scale.numel() * q.scale.element_size()
            bases += module.base.numel() * module.base.element_size()
    return used, bases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per variant")
    parser.add_argument("--steps", type=int, default=3, help="training steps (and forwards) per block")
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "rtdetr_quickstart.yaml")
    data = build_datasets(cfg.data, cache_dir(None))
    batches = training_batches(cfg, data, args.steps)
    built = {name: make_variant(cfg, len(data.class_names), quant) for name, quant in
             (("float", "none"), ("int8wo", "int8wo"))}
    (float_used, _), (quant_used, bases) = (weight_bytes(model) for model, _, _ in built.values())
    quantised = sum(m.base.numel() for m in built["int8wo"][0].modules() if isinstance(m, QuantisedLinear))
    total = sum(p.numel() for p in built["float"][0].parameters())
    print(f"rtdetr quickstart: {total / 1e6:.2f}M parameters, {quantised / 1e6:.2f}M of them in the "
          f"{sum(isinstance(m, QuantisedLinear) for m in built['int8wo'][0].modules())} quantised Linear layers "
          f"({quantised / total:.0%})")
    print(f"weights computed with: float {float_used / 2**20:.2f} MiB, int8wo {quant_used / 2**20:.2f} MiB "
          f"({quant_used / float_used:.2f}x); int8wo also keeps its float bases: {bases / 2**20:.2f} MiB")
    for phase, index in (("train step", 1), ("inference forward", 2)):
        times = timed({name: parts[index] for name, parts in built.items()}, batches, args.blocks)
        ratios = [q / f for f, q in zip(times["float"], times["int8wo"])]
        print(f"{phase}: float {statistics.median(times['float']) * 1000:.0f} ms, int8wo "
              f"{statistics.median(times['int8wo']) * 1000:.0f} ms; int8wo time / float time: median "
              f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"({args.blocks} blocks of {args.steps} per variant, {cfg.data.image_size} px, batch {cfg.train.batch_size}, "
          f"{cfg.run.amp} autocast + channels_last, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
