"""`cfg.data` -> the run's train and val samples: read the format, preflight, split.

    read_sources  the configured format -> {split: Annotations} (samples + findings)
    preflight     + image checks -> a report; on_error: fail raises, skip drops images
    split         val_ratio (+ manifest) when there is no validation source
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detpact.config import DataConfig, SplitSource
from detpact.data.coco_voc import read_coco, read_voc
from detpact.data.detect import resolve_auto
from detpact.data.fingerprint import dataset_fingerprint
from detpact.data.formats import IMAGE_SUFFIXES, Annotations, Sample, read_class_names, read_yolo, yolo_label_dir
from detpact.data.preflight import PreflightReport, list_findings, run_preflight
from detpact.data.split import resolve_split
from detpact.data.synthetic import ensure_synthetic
from detpact.errors import DetpactError

# The keys detpact reads from an Ultralytics dataset YAML. Anything else is refused:
# in particular `download`, which Ultralytics may execute as Python or shell.
DATASET_YAML_KEYS = ("path", "train", "val", "test", "names", "nc")


@dataclass
class DatasetSplits:
    """Everything the run needs to know about its data."""

    root: Path
    mode: str  # "real" or "synthetic"
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    fingerprint: str
    preflight: PreflightReport
    skipped: list[dict[str, Any]] = field(default_factory=list)  # on_error: skip
    split: dict[str, Any] | None = None  # how val was held out (val_ratio)

    def summary(self) -> dict[str, Any]:
        """The data facts for run_meta.json and train_report.json."""
        out: dict[str, Any] = {"mode": self.mode, "root": str(self.root), "num_train": len(self.train),
                               "num_val": len(self.val), "class_names": self.class_names,
                               "preflight": self.preflight.counts()}
        if self.skipped:
            out["skipped"] = {"images": sum(entry["image"] for entry in self.skipped), "files": self.skipped}
        if self.split is not None:
            out["split"] = self.split
        return out


@dataclass
class Sources:
    """A dataset read but not yet checked: its root, format and each split's annotations."""

    root: Path
    format: str
    class_names: list[str]
    splits: dict[str, Annotations]


def build_datasets(cfg: DataConfig, cache_dir: Path, progress: bool = True) -> DatasetSplits:
    """Read, preflight and split the dataset `cfg` names.

    cache_dir: where the synthetic dataset goes when `data.path` is not set, and where
    preflight caches its image checks.
    """
    cfg = resolve_auto(cfg, cache_dir)
    sources = read_sources(cfg, cache_dir)
    report = run_preflight(sources.root, sources.format, sources.splits, cache_dir, progress)
    if report.errors and cfg.on_error == "fail":
        raise DetpactError(failure_message(report))
    dropped = {f.image for f in report.errors if f.image is not None}
    skipped = _skipped(report)
    split_info = None
    train = sources.splits["train"].samples
    if "val" in sources.splits:
        val = sources.splits["val"].samples
    else:  # val_ratio: split the pool, bad images included, so fixing one later keeps the split
        manifest = Path(cfg.split_manifest) if cfg.split_manifest else None
        train_idx, val_idx, split_info = resolve_split(train, sources.root, cfg.val_ratio, cfg.split_seed,
                                                       cfg.stratify, manifest)
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    train = [s for s in train if s.image_path not in dropped]
    val = [s for s in val if s.image_path not in dropped]
    for name, samples in (("train", train), ("val", val)):
        if not samples:
            raise DetpactError(f"The {name} split of {sources.root} has no usable image"
                               f"{' after skipping bad ones' if dropped else ''}. Add images or fix the "
                               f"data.{name} source{' / data.val_ratio' if name == 'val' else ''}.")
    fingerprint = dataset_fingerprint(sources.root, [("train", train), ("val", val)], sources.class_names)
    mode = "synthetic" if cfg.format == "synthetic" else "real"
    return DatasetSplits(sources.root, mode, sources.class_names, train, val, fingerprint, report, skipped,
                         split_info)


def _skipped(report: PreflightReport) -> list[dict[str, Any]]:
    """What `on_error: skip` leaves out: each dropped image, and each file whose errors
    concern no image (e.g. a label file without an image), with the finding kinds."""
    reasons: dict[tuple[bool, Path], set[str]] = {}
    for finding in report.errors:
        key = (True, finding.image) if finding.image is not None else (False, finding.path)
        reasons.setdefault(key, set()).add(finding.kind)
    return [{"file": report.relative(path), "image": is_image, "reasons": sorted(kinds)}
            for (is_image, path), kinds in sorted(reasons.items(), key=lambda item: (not item[0][0], str(item[0][1])))]


def failure_message(report: PreflightReport) -> str:
    return (f"Dataset preflight of {report.root} found {report.summary()}:\n{list_findings(report.errors)}\n"
            "Fix the files (run `detpact data preflight CONFIG --output-json F` for the full report), or set "
            "data.on_error: skip to train without the affected images (they are listed in train_report.json).")


def read_sources(cfg: DataConfig, cache_dir: Path) -> Sources:
    """Read each split of the configured dataset (no image decoding, no checks beyond the
    readers' findings)."""
    cfg = resolve_auto(cfg, cache_dir)
    if cfg.format == "synthetic":
        spec = cfg.synthetic
        root = Path(cfg.path) if cfg.path else cache_dir / f"synthetic-{_synthetic_key(cfg)}"
        ensure_synthetic(root, num_train=spec.num_train, num_val=spec.num_val, image_size=spec.image_size,
                         seed=spec.seed, max_objects=spec.max_objects, domain=spec.domain)
        return read_yolo_sources(root, {"train": SplitSource(images="images/train"),
                                              "val": SplitSource(images="images/val")}, None, "synthetic")
    path = Path(cfg.path).resolve()
    if cfg.format == "yolo" and path.is_file() and path.suffix in (".yaml", ".yml"):
        if cfg.train or cfg.val:
            raise DetpactError(f"data.path names a dataset YAML ({path}), which sets the splits itself: remove "
                               "data.train / data.val from the config.")
        root, splits, names = read_dataset_yaml(path)
        if cfg.val_ratio is not None:
            splits.pop("val", None)
        return read_yolo_sources(root, splits, cfg.classes or names, "yolo")
    if not path.is_dir():
        raise DetpactError(
            f"Dataset folder not found: {path} (data.path). Point data.path at your dataset folder; detpact never "
            "substitutes built-in data for a missing dataset (use data.format: synthetic to train on the built-in "
            "shapes explicitly)."
        )
    splits = {"train": cfg.train or SplitSource(images="images/train")}
    if cfg.val is not None or (cfg.val_ratio is None and cfg.format == "yolo"):
        splits["val"] = cfg.val or SplitSource(images="images/val")
    if "val" not in splits and cfg.val_ratio is None:
        raise DetpactError(f"No validation data for {path}: set data.val (images and annotations of a validation "
                           "split) or data.val_ratio (hold out part of data.train).")
    if cfg.format == "yolo":
        return read_yolo_sources(path, splits, cfg.classes, "yolo")
    if cfg.format == "coco":
        read = {name: read_coco(_dataset_path(path, s.annotations, f"data.{name}.annotations"),
                                _dataset_path(path, s.images, f"data.{name}.images")) for name, s in splits.items()}
        names = _same_classes(read, cfg.classes, "categories")
        return Sources(path, "coco", names, read)
    voc_dirs = {name: (_dataset_path(path, s.annotations, f"data.{name}.annotations"),
                       _dataset_path(path, s.images, f"data.{name}.images")) for name, s in splits.items()}
    read = {name: read_voc(xml, img, cfg.classes) for name, (xml, img) in voc_dirs.items()}
    # Without data.classes: the union of every split's names, so that class ids agree (a
    # split that lacks some of them is read again with the full list).
    names = list(cfg.classes) if cfg.classes else sorted({n for a in read.values() for n in a.class_names})
    read = {name: a if a.class_names == names else read_voc(*voc_dirs[name], names) for name, a in read.items()}
    return Sources(path, "voc", names, read)


def yolo_folder_splits(root: Path, flat_name: str) -> dict[str, SplitSource]:
    """The splits of a YOLO folder: each subfolder of `images/`, or `images/` itself as
    the one split `flat_name` when it holds images directly (or has no subfolder)."""
    image_root = root / "images"
    if not image_root.is_dir():
        raise DetpactError(f"{root} has no images/ folder: pass a detpact config, an Ultralytics dataset YAML, or a "
                           "YOLO folder with images/[<split>/] and labels/[<split>/].")
    entries = sorted(image_root.iterdir())
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return {flat_name: SplitSource(images="images")}
    return {p.name: SplitSource(images=f"images/{p.name}") for p in entries if p.is_dir()} or \
        {flat_name: SplitSource(images="images")}


def read_yolo_sources(root: Path, splits: dict[str, SplitSource], names: list[str] | None,
                       fmt: str) -> Sources:
    class_names = read_class_names(root, names)
    read = {}
    for name, source in splits.items():
        images = _dataset_path(root, source.images, f"data.{name}.images")
        if not images.exists():
            hint = " or set data.val_ratio to hold out part of train" if name == "val" else ""
            raise DetpactError(f"The {name} images of {root} are not at {images}: fix data.{name}{hint}.")
        labels = _dataset_path(root, source.labels, f"data.{name}.labels") if source.labels else \
            yolo_label_dir(images) if images.is_dir() else images
        read[name] = read_yolo(images, labels, class_names)
    return Sources(root, fmt, class_names, read)


def read_dataset_yaml(path: Path) -> tuple[Path, dict[str, SplitSource], list[str]]:
    """An Ultralytics dataset YAML: (root, split sources, class names). Only plain keys are
    read; `download` scripts and any other key are refused, never run."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DetpactError(f"Dataset YAML {path} cannot be read: {exc}.") from None
    if not isinstance(data, dict):
        raise DetpactError(f"Dataset YAML {path} must be a mapping with path, train, val and names.")
    unknown = sorted(str(k) for k in data if k not in DATASET_YAML_KEYS)
    if unknown:
        raise DetpactError(f"Dataset YAML {path} has keys detpact does not read: {', '.join(unknown)}. Valid keys: "
                           f"{', '.join(DATASET_YAML_KEYS)}. Remove them (detpact never runs a 'download' script; "
                           "fetch the data yourself).")
    root = (path.parent / str(data.get("path") or ".")).resolve()
    splits = {}
    for name in ("train", "val"):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DetpactError(f"Dataset YAML {path}: '{name}' must be one folder or .txt list (got {value!r}).")
        splits[name] = SplitSource(images=value)
    if "train" not in splits:
        raise DetpactError(f"Dataset YAML {path} has no 'train' entry.")
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DetpactError(f"Dataset YAML {path}: 'names' keys must be the class ids 0..{len(names) - 1}.")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DetpactError(f"Dataset YAML {path} needs 'names': the class names, as a list or {{id: name}}.")
    if data.get("nc") is not None and data["nc"] != len(names):
        raise DetpactError(f"Dataset YAML {path}: nc is {data['nc']} but 'names' has {len(names)} entries.")
    return root, splits, [str(n) for n in names]


def _dataset_path(root: Path, relative: str | None, key: str) -> Path:
    """`root / relative`, refusing absolute paths and `..` escapes out of the dataset folder."""
    if relative is None:
        raise DetpactError(f"{key} is required for this data.format.")
    path = root / relative
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise DetpactError(f"{key} must be a path inside the dataset folder {root} (no absolute paths or '..'), "
                           f"got {relative!r}.")
    return path


def _same_classes(read: dict[str, Annotations], configured: list[str] | None, what: str) -> list[str]:
    names = {name: a.class_names for name, a in read.items()}
    first = next(iter(names.values()))
    if any(n != first for n in names.values()):
        raise DetpactError(f"The splits' {what} differ ({names}): train and val must use the same classes.")
    if configured and list(configured) != first:
        raise DetpactError(f"data.classes {configured} differs from the dataset's {what} {first}: remove "
                           "data.classes or make it match.")
    return first


def _synthetic_key(cfg: DataConfig) -> str:
    # The plain domain keeps the cache folder it had before domains existed.
    spec = json.dumps(cfg.synthetic.model_dump(exclude={"domain"} if cfg.synthetic.domain == "plain" else None),
                      sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]
