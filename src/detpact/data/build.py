"""`cfg.data` -> the run's train and val samples: read the format, preflight, split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from detpact.config import DataConfig
from detpact.data.fingerprint import dataset_fingerprint
from detpact.data.formats import Sample, read_class_names, read_yolo_split
from detpact.data.synthetic import ensure_synthetic
from detpact.errors import DetpactError


@dataclass
class DatasetSplits:
    """Everything the run needs to know about its data."""

    root: Path
    mode: str  # "real" or "synthetic"
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    fingerprint: str


def build_datasets(cfg: DataConfig, cache_dir: Path) -> DatasetSplits:
    """Resolve the dataset folder (generating the synthetic one if named), read both splits.

    cache_dir: where the synthetic dataset goes when `data.path` is not set.
    """
    if cfg.format == "synthetic":
        spec = cfg.synthetic
        root = Path(cfg.path) if cfg.path else cache_dir / f"synthetic-{_synthetic_key(cfg)}"
        ensure_synthetic(
            root, num_train=spec.num_train, num_val=spec.num_val, image_size=spec.image_size,
            seed=spec.seed, max_objects=spec.max_objects,
        )
        mode = "synthetic"
    else:
        root = Path(cfg.path)
        if not root.is_dir():
            raise DetpactError(
                f"Dataset folder not found: {root} (data.path). Point data.path at your dataset "
                "folder; detpact never substitutes built-in data for a missing dataset "
                "(use data.format: synthetic to train on the built-in shapes explicitly)."
            )
        mode = "real"
    class_names = read_class_names(root, cfg.classes)
    train = read_yolo_split(root, "train", len(class_names))
    val = read_yolo_split(root, "val", len(class_names))
    fingerprint = dataset_fingerprint(root, [("train", train), ("val", val)], class_names)
    return DatasetSplits(root, mode, class_names, train, val, fingerprint)


def _synthetic_key(cfg: DataConfig) -> str:
    spec = json.dumps(cfg.synthetic.model_dump(), sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]
