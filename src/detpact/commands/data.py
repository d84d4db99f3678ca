"""`detpact data preflight|show`: check a dataset, and draw its augmented samples, without training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from detpact.config import DataConfig, is_config_file, load_config
from detpact.data.build import Sources, build_datasets, read_sources, read_yolo_folder
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
    cfg = load_config(config, overrides)
    data = build_datasets(cfg.data, resolve_cache_dir(os.environ if environ is None else environ))
    dataset = DetectionDataset(data.train, cfg.data.image_size, train=True, seed=cfg.run.seed,
                               augment=cfg.data.augment)
    return save_grid(dataset, data.class_names, Path(out), count=count, epoch=epoch)


def _dataset_sources(target: Path, overrides: Sequence[str], cache_dir: Path) -> Sources:
    """The dataset a `data` command names: a detpact config, a dataset YAML or a YOLO folder."""
    if target.is_dir():
        return read_yolo_folder(target)
    if is_config_file(target):
        return read_sources(load_config(target, overrides).data, cache_dir)
    if target.suffix in (".yaml", ".yml") and target.is_file():
        return read_sources(DataConfig(format="yolo", path=str(target)), cache_dir)
    raise DetpactError(f"{target} is neither a config / dataset YAML file nor a dataset folder.")


