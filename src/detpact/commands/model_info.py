"""`detpact model info CONFIG`: what the configured detector costs, without training it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detpact.config import DataConfig, load_config
from detpact.data.build import read_sources
from detpact.data.shapes import CLASS_NAMES
from detpact.errors import DetpactError
from detpact.models.detector import build_model
from detpact.models.info import model_info


def describe_model(config: str | Path, *, overrides: Sequence[str] = (), num_classes: int | None = None,
                   image_size: int | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Parameters, GFLOPs, output strides and channels and CPU forward time (batch 1) of the
    detector `config` describes, at `image_size` (default data.image_size).

    The class count is `num_classes`, else the config's data.classes, else the dataset's
    (the synthetic data's, or read from the dataset's labels without decoding images).
    """
    cfg = load_config(config, list(overrides))
    size = image_size or cfg.data.image_size
    if size % 32:
        raise DetpactError(f"--image-size must be a multiple of 32 (the detector's largest stride), got {size}.")
    classes = num_classes or _dataset_classes(cfg.data, cache_dir)
    model = build_model(cfg.model, classes)
    info = model_info(model, size)
    return {"config": str(config), "backbone": cfg.model.backbone.name, "neck": cfg.model.neck.name,
            "head": cfg.model.head.name, "num_classes": classes, **info}


def _dataset_classes(cfg: DataConfig, cache_dir: Path | None) -> int:
    if cfg.classes:
        return len(cfg.classes)
    if cfg.format == "synthetic":
        return len(CLASS_NAMES)
    if cache_dir is None:
        raise DetpactError("Cannot tell the class count: pass --num-classes N.")
    return len(read_sources(cfg, cache_dir).class_names)


def format_model_info(info: Mapping[str, Any]) -> str:
    """The report as aligned text lines."""
    parts = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in info["params_by_part"].items() if count)
    levels = ", ".join(f"P{i + 3}: stride {lv['stride']}, {lv['backbone_channels']} ch"
                       for i, lv in enumerate(info["levels"]))
    outputs = info["outputs"]
    rows = [
        ("model", f"{info['backbone']} + {info['neck']} neck + {info['head']} head, {info['num_classes']} classes"),
        ("parameters", f"{info['params'] / 1e6:.2f}M ({parts})"),
        ("GFLOPs", f"{info['gflops']:.2f} at {info['image_size']}x{info['image_size']}"),
        ("backbone levels", levels),
        ("head input channels", ", ".join(map(str, info["head_channels"]))),
        ("outputs", f"boxes {outputs['boxes']}, cls_logits {outputs['cls_logits']}, decoded by {outputs['decoding']}"),
        ("CPU forward", f"{info['cpu_forward_ms']:.1f} ms at batch 1 ({info['threads']} threads, fp32)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
