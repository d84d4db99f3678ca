"""Which dataset a path holds (`data.format: auto`, the default): a YOLO folder, an
Ultralytics dataset YAML, a Pascal VOC folder, or a COCO JSON (or a folder holding one).

`resolve_auto` turns an `auto` data section into the concrete one the readers take: the
format, the split sources found, and for a folder without a validation split a held-out
`val_ratio` of 0.2 (stratified, its manifest written to the cache folder). A folder
holding more than one format is refused with what was found, never guessed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from detpact.config import DataConfig, SplitSource
from detpact.data.formats import IMAGE_SUFFIXES
from detpact.errors import DetpactError

log = logging.getLogger(__name__)

DEFAULT_VAL_RATIO = 0.2
_PEEK = 1 << 16  # a COCO JSON names "images" / "categories" within its first 64 KiB
_MAX_SCAN = 20000  # files looked at when searching a folder for label files


@dataclass
class Found:
    """A dataset found at a path: its format, root, split sources and how it was recognised."""

    format: str
    root: Path
    evidence: str
    splits: dict[str, SplitSource] = field(default_factory=dict)
    dataset_yaml: Path | None = None


def resolve_auto(cfg: DataConfig, cache_dir: Path) -> DataConfig:
    """`cfg` with format `auto` made concrete (any other format is returned as it is)."""
    if cfg.format != "auto":
        return cfg
    found = detect_dataset(Path(cfg.path))
    log.info("data.path %s: %s dataset (%s)", cfg.path, found.format.upper(), found.evidence)
    update: dict = {"format": found.format}
    if found.dataset_yaml is not None:
        return DataConfig.model_validate({**cfg.model_dump(), **update, "path": str(found.dataset_yaml)})
    update["path"] = str(found.root)
    update["train"] = cfg.train or found.splits["train"]
    if cfg.val is None and cfg.val_ratio is None and "val" in found.splits:
        update["val"] = found.splits["val"]
    elif cfg.val is None and cfg.val_ratio is None:  # one unsplit folder: hold out a share for validation
        digest = hashlib.sha256(str(found.root.resolve()).encode()).hexdigest()[:12]
        update.update(val_ratio=DEFAULT_VAL_RATIO, stratify=True, split_manifest=cfg.split_manifest or str(
            cache_dir / "splits" / f"{found.root.name}-{digest}-val{DEFAULT_VAL_RATIO}-seed{cfg.split_seed}.json"))
        log.info("no validation split in %s: holding out %d %% of its images (stratified by box count; "
                 "set data.val or data.val_ratio to choose)", found.root, round(DEFAULT_VAL_RATIO * 100))
    return DataConfig.model_validate({**cfg.model_dump(), **update})


def detect_dataset(path: Path) -> Found:
    """The dataset at `path`, or a DetpactError saying what was found instead."""
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _coco(path, path, [path])
        if path.suffix.lower() in (".yaml", ".yml"):
            return Found("yolo", path.parent, "an Ultralytics dataset YAML", dataset_yaml=path)
        raise DetpactError(f"{path} is not a dataset: data.path takes a dataset folder, an Ultralytics dataset YAML "
                           "or a COCO JSON file.")
    if not path.is_dir():
        raise DetpactError(f"Dataset not found: {path} (data.path). Point data.path at your dataset folder, dataset "
                           "YAML or COCO JSON file.")
    candidates = {"yolo": _yolo_evidence(path), "voc": _voc_evidence(path), "coco": _coco_files(path)}
    present = {fmt: evidence for fmt, evidence in candidates.items() if evidence}
    if len(present) > 1:
        listing = "; ".join(f"{fmt.upper()}: {_describe(evidence, path)}" for fmt, evidence in present.items())
        raise DetpactError(f"{path} holds more than one dataset format ({listing}). Set data.format to the one to "
                           f"read ({', '.join(present)}), or point data.path at a folder holding only that one.")
    if not present:
        raise DetpactError(f"No dataset found in {path}: expected a YOLO folder (images/ with labels/ and "
                           "classes.txt), Pascal VOC XML files (annotations/ or beside the images), or a COCO JSON. "
                           "Set data.format and the split sources (docs/datasets.md) for another layout.")
    fmt, evidence = next(iter(present.items()))
    if fmt == "yolo":
        return Found("yolo", path, _describe(evidence, path), _yolo_splits(path))
    if fmt == "voc":
        xml_dir, image_dir = voc_dirs(path, None)
        splits = {"train": SplitSource(images=_rel(image_dir, path), annotations=_rel(xml_dir, path))}
        return Found("voc", path, _describe(evidence, path), splits)
    return _coco(None, path, evidence)


def voc_dirs(src: Path, images: str | Path | None) -> tuple[Path, Path]:
    """(XML folder, image folder) of a VOC dataset folder: annotations/ or Annotations/
    (else the folder itself), and images/ or JPEGImages/ (else the folder itself when its
    images sit beside their XML)."""
    if not src.is_dir():
        raise DetpactError(f"VOC source {src} is not a folder: pass the folder holding annotations/ and images/, "
                           "or the folder of XML files with --images DIR.")
    xml_dir = next((src / n for n in ("annotations", "Annotations") if (src / n).is_dir()), src)
    image_dir = Path(images) if images else next(
        (d / n for d in (src, src.parent) for n in ("images", "JPEGImages") if (d / n).is_dir()), None)
    if image_dir is None and any(p.suffix.lower() in IMAGE_SUFFIXES for p in xml_dir.iterdir()):
        image_dir = xml_dir  # images beside their XML files
    if image_dir is None:
        raise DetpactError(f"No images/ or JPEGImages/ folder next to the VOC annotations {xml_dir}: pass "
                           "--images DIR.")
    return xml_dir, image_dir


def coco_image_root(json_path: Path) -> Path:
    """The image folder next to a COCO JSON: `<dataset>/images/<split>` (coco128 and
    convert's own output), `<dataset>/<split>` (COCO's layout), then `images/` folders."""
    split = json_path.stem.removeprefix("instances").lstrip("_")
    tried = []
    for base in (json_path.parent.parent, json_path.parent):
        tried += [base / "images" / split, base / split, base / "images"] if split else [base / "images"]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise DetpactError(f"No image folder found for {json_path} (tried {', '.join(str(p) for p in tried)}): pass "
                       "--images DIR, the folder the file_name entries are relative to.")


def _coco(single: Path | None, path: Path, files: list[Path]) -> Found:
    """A COCO dataset of one JSON per split: *train* and *val* by name, or one unsplit file.
    Its root is the folder holding both the JSON files and their image folders."""
    by_split = {name: [f for f in files if name in f.stem.lower()] for name in ("train", "val")}
    if single is None and (len(by_split["train"]) > 1 or len(by_split["val"]) > 1 or
                           (len(files) > 1 and not by_split["train"])):
        raise DetpactError(f"{path} holds several COCO JSON files ({', '.join(f.name for f in files)}) and which is "
                           "train and which val is not clear: point data.path at one of them, or set data.format: coco "
                           "with data.train / data.val.")
    train = single or (by_split["train"] or files)[0]
    val = by_split["val"][0] if single is None and by_split["val"] and by_split["val"][0] != train else None
    chosen = {"train": train, **({"val": val} if val else {})}
    image_roots = {name: coco_image_root(json_path) for name, json_path in chosen.items()}
    root = Path(os.path.commonpath([p.resolve() for p in (*chosen.values(), *image_roots.values())]))
    splits = {name: SplitSource(images=_rel(image_roots[name].resolve(), root), annotations=_rel(json_path.resolve(), root))
              for name, json_path in chosen.items()}
    return Found("coco", root, f"COCO JSON {', '.join(f.name for f in chosen.values())}", splits)


def _yolo_splits(root: Path) -> dict[str, SplitSource]:
    """images/ itself (unsplit), or its subfolders: *train* and *val* by name; one folder is train."""
    image_root = root / "images"
    entries = sorted(image_root.iterdir())
    folders = [p.name for p in entries if p.is_dir()]
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries) or not folders:
        return {"train": SplitSource(images="images")}
    train = [f for f in folders if "train" in f.lower()] or (folders if len(folders) == 1 else [])
    val = [f for f in folders if "val" in f.lower()]
    if len(train) != 1 or len(val) > 1:
        raise DetpactError(f"The image folders of {image_root} ({', '.join(folders)}) do not say which is train and "
                           "which val: name them train/ and val/, or set data.format: yolo with data.train and "
                           "data.val.")
    splits = {"train": SplitSource(images=f"images/{train[0]}")}
    if val:
        splits["val"] = SplitSource(images=f"images/{val[0]}")
    return splits


def _yolo_evidence(root: Path) -> list[Path]:
    labels = root / "labels"
    if not (root / "images").is_dir() or not labels.is_dir():
        return []
    return _first_files(labels, ".txt")


def _voc_evidence(root: Path) -> list[Path]:
    folders = [root / n for n in ("annotations", "Annotations") if (root / n).is_dir()] + [root, root / "images"]
    return [p for folder in folders if folder.is_dir() for p in _first_files(folder, ".xml", recursive=False)]


def _coco_files(root: Path) -> list[Path]:
    folders = [root, root / "annotations"]
    return [p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.json")) if _looks_like_coco(p)]


def _looks_like_coco(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(_PEEK)
    except OSError:
        return False
    return b'"images"' in head or b'"categories"' in head


def _first_files(folder: Path, suffix: str, recursive: bool = True, limit: int = 3) -> list[Path]:
    """Up to `limit` files with `suffix` in `folder` (searching at most _MAX_SCAN entries)."""
    found = []
    for count, path in enumerate(folder.rglob("*") if recursive else folder.iterdir()):
        if count >= _MAX_SCAN or len(found) >= limit:
            break
        if path.suffix.lower() == suffix and path.is_file():
            found.append(path)
    return found


def _describe(evidence: list[Path], root: Path) -> str:
    return ", ".join(_rel(p, root) for p in evidence[:2]) + (" ..." if len(evidence) > 2 else "")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
