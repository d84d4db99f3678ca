"""`detpact data preflight|show`: check a dataset, and draw its augmented samples, without training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from detpact.config import DataConfig, is_config_file, load_config, load_config_or_dataset
from detpact.data.build import Sources, build_datasets, read_sources
from detpact.data.dataset import DetectionDataset
from detpact.data.preflight import PreflightReport, run_preflight
from detpact.data.show import save_grid
from detpact.errors import DetpactError
from detpact.run.atomic import atomic_write_json
from detpact.run.contract import resolve_cache_dir


def preflight(target: str | Path, *, output_json: str | Path | None = None, overrides: Sequence[str] = (),
              environ: Mapping[str, str] | None = None) -> PreflightReport:
    """Check every image and label of a dataset without training; writes `output_json` if given.

    target: a detpact config, an Ultralytics dataset YAML, or a YOLO folder (images/<split>/).
    """
    cache_dir = resolve_cache_dir(os.environ if environ is None else environ)
    sources = _dataset_sources(Path(target), overrides, cache_dir)
    report = run_preflight(sources.root, sources.format, sources.splits, cache_dir)
    if output_json is not None:
        atomic_write_json(Path(output_json), report.to_json())
    return report


def show_samples(config: str | Path, *, out: str | Path, count: int = 16, epoch: int = 0,
                 overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Path:
    """Draw the first `count` training samples of `epoch`, augmented exactly as training
    would see them, with their boxes and class names, into the PNG `out`."""
    cfg = load_config_or_dataset(config, overrides)
    data = build_datasets(cfg.data, resolve_cache_dir(os.environ if environ is None else environ))
    dataset = DetectionDataset(data.train, cfg.data.image_size, train=True, seed=cfg.run.seed,
                               augment=cfg.data.augment)
    return save_grid(dataset, data.class_names, Path(out), count=count, epoch=epoch)


def _dataset_sources(target: Path, overrides: Sequence[str], cache_dir: Path) -> Sources:
    """The dataset a `data` command names: a detpact config's, or the dataset at the path
    (a YOLO or VOC folder, a dataset YAML, a COCO JSON or a folder holding one)."""
    if is_config_file(target):
        return read_sources(load_config(target, overrides).data, cache_dir)
    if overrides:
        raise DetpactError("--set applies to a detpact config; pass one instead of a dataset path to override keys.")
    return read_sources(DataConfig(format="auto", path=str(target)), cache_dir)
