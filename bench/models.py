"""The model zoo's table: every backbone x head with parameters, GFLOPs at 320 and 640
and CPU forward time (batch 1, fp32, eval mode, median of repeats after a warm-up).

Writes the markdown table that docs/models.md shows (between its BEGIN/END markers
with --write), so anyone can rerun it:

    .venv/bin/python bench/models.py [--runs 5] [--sizes 320 640] [--write]

80 classes (COCO's count) for every row. Each model is measured alone, one after
another, in this process, with torch's default thread count for the machine.
"""

from __future__ import annotations

import argparse
import re
from datetime import date
from pathlib import Path

import torch

from detpact.config import ModelConfig
from detpact.models.detector import build_model
from detpact.models.info import model_info

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "models.md"
NUM_CLASSES = 80
BACKBONES = [
    ("tiny_cnn", {}),
    ("cspdarknet", {"size": "n"}),
    ("cspdarknet", {"size": "s"}),
    ("resnet18", {}),
    ("resnet34", {}),
    ("resnet50", {}),
    ("convnext_tiny", {}),
    ("cspresnet", {}),
]
HEADS = {
    "dense": {"head": {"name": "dense"}},
    "rtdetr": {"head": {"name": "rtdetr"}},  # d_model 256, 6 decoder layers, 300 queries (RT-DETR's defaults)
}


def measure(backbone: str, args: dict, head: str, sizes: list[int], runs: int) -> dict:
    cfg = ModelConfig.model_validate({"backbone": {"name": backbone, "args": args}, **HEADS[head]})
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    infos = {size: model_info(model, size, time_runs=runs) for size in sizes}
    first = infos[sizes[0]]
    return {"backbone": backbone + (f" ({args['size']})" if "size" in args else ""), "head": head,
            "params": first["params"], "gflops": {s: i["gflops"] for s, i in infos.items()},
            "ms": {s: i["cpu_forward_ms"] for s, i in infos.items()}, "threads": first["threads"]}


def table(rows: list[dict], sizes: list[int]) -> str:
    head = ["backbone", "head", "params (M)"] + [f"GFLOPs @{s}" for s in sizes] + [f"CPU ms @{s}" for s in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["backbone"], r["head"], f"{r['params'] / 1e6:.2f}"]
        cells += [f"{r['gflops'][s]:.1f}" for s in sizes] + [f"{r['ms'][s]:.0f}" for s in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per model and size (median)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/models.md")
    args = parser.parse_args()
    rows = []
    for backbone, bargs in BACKBONES:
        for head in HEADS:
            rows.append(measure(backbone, bargs, head, args.sizes, args.runs))
            r = rows[-1]
            print(f"{r['backbone']:<18} {head:<7} {r['params'] / 1e6:6.2f}M  "
                  + "  ".join(f"{r['gflops'][s]:.1f} GFLOPs / {r['ms'][s]:.0f} ms @{s}" for s in args.sizes),
                  flush=True)
    text = table(rows, args.sizes)
    footer = f"({rows[0]['threads']} threads, batch 1, fp32, {NUM_CLASSES} classes, {date.today()})"
    print(f"\n{text}\n\n{footer}")
    if args.write:
        doc = DOC.read_text()
        new = re.sub(r"(<!-- BEGIN bench/models.py -->\n).*?(<!-- END bench/models.py -->)",
                     lambda m: f"{m.group(1)}{text}\n\n{footer}\n{m.group(2)}", doc, flags=re.S)
        DOC.write_text(new)


if __name__ == "__main__":
    main()
