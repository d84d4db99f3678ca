"""Dataset conversion between YOLO, COCO and Pascal VOC (`detpact data convert`).

    read    the source format -> {split: Annotations}, through the readers of
            formats.py / coco_voc.py (split "" = a source without splits)
    check   preflight: the readers' findings + every image decoded (missing, unreadable,
            size differs from the annotation); any error refuses unless `force`
    place   OUT/images/<split>/<rel>: a symlink to the original image, or a copy
    write   YOLO labels + classes.txt + dataset.yaml, or one COCO JSON per split

Output (`<rel>` = the image's path below the split's common image folder):

    yolo   OUT/images/<split>/<rel>                   symlink (default) or copy
           OUT/labels/<split>/<rel>.txt               `class cx cy w h`, normalised
           OUT/classes.txt, OUT/dataset.yaml          Ultralytics keys path/train/val/test/names
    coco   OUT/images/<split>/<rel>                   symlink (default) or copy
           OUT/annotations/instances[_<split>].json   file_name = <rel>

Why symlinks rather than a .txt list of the original paths: detpact's and Ultralytics'
YOLO readers find a listed image's labels by swapping the last `images` folder of the
image's own (resolved) path for `labels`, which for the original paths is a folder next
to the originals, inside SRC. A link in OUT/images keeps the labels in OUT.

Numbers keep full precision: boxes are written as shortest round-trip float64 (`repr`)
from the float32 Sample boxes, so a round trip through any formats changes a box by at
most the float32 rounding of the reader (about 6e-8 relative). Ignore regions (COCO
crowd, VOC difficult) become COCO `iscrowd: 1`; YOLO has no such thing, so they are left
out of YOLO labels and counted in the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detpact.data.build import read_dataset_yaml, read_yolo_sources, yolo_folder_splits
from detpact.data.coco_voc import read_coco, read_voc
from detpact.data.detect import coco_image_root, detect_dataset, voc_dirs
from detpact.data.formats import (
    Annotations,
    Finding,
    Sample,
)
from detpact.data.preflight import list_findings, run_preflight
from detpact.errors import DetpactError
from detpact.run.atomic import atomic_write_text

SOURCE_FORMATS = ("coco", "voc", "yolo")
TARGET_FORMATS = ("yolo", "coco")
MAX_LISTED = 20


def convert(src_format: str | None, dst_format: str, src: str | Path, out: str | Path, copy_images: bool = False,
            images: str | Path | None = None, classes: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Read the dataset `src` in `src_format` and write it to the new folder `out` in
    `dst_format`; returns the summary (counts, left-out ignore boxes, findings).

    src: coco - the JSON file (images under `images`, default: a guess such as
    ../images/<split>); voc - a folder with annotations/ (or Annotations/) and images/
    (or JPEGImages/), or the XML folder itself with `images`; yolo - a folder with
    images/[<split>/], labels/ and classes.txt, or an Ultralytics dataset YAML.
    classes: class names in id order (voc: fixes the order; yolo: replaces classes.txt /
    names; coco: must equal the categories). force: convert despite error findings.
    """
    src = Path(src)
    if src_format is None:  # recognised as training recognises it (data.format: auto)
        found = detect_dataset(src)
        src_format = found.format
        if found.format == "coco" and not src.is_file():
            if len(found.splits) > 1:
                raise DetpactError(f"{src} holds a COCO JSON per split: convert one at a time, naming the JSON file "
                                   "as SRC.")
            src = found.root / found.splits["train"].annotations
        elif found.dataset_yaml is not None:
            src = found.dataset_yaml
    if src_format not in SOURCE_FORMATS or dst_format not in TARGET_FORMATS:
        raise DetpactError(f"Cannot convert {src_format!r} to {dst_format!r}: sources are {', '.join(SOURCE_FORMATS)}"
                           f", targets {', '.join(TARGET_FORMATS)}.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DetpactError(f"Output folder {out} exists and is not an empty folder: convert writes a new dataset into a new or empty folder. "
                           "Choose another OUT or remove it first.")
    splits, read_from = read_source(src_format, src, images, classes)
    _check_outside_source(out, read_from)
    findings = run_preflight(src, src_format, splits).findings  # the readers' findings + every image decoded
    errors = [f for f in findings if f.severity == "error"]
    if errors and not force:
        raise DetpactError(_refusal(src, errors))
    unusable = {f.image for f in errors if f.kind in ("missing_image", "unreadable_image")}
    splits = {name: dataclasses.replace(a, samples=[s for s in a.samples if s.image_path not in unusable])
              for name, a in splits.items()}

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = write_yolo(splits, out, copy_images) if dst_format == "yolo" else \
            _write_coco_dataset(splits, out, copy_images)
    except BaseException:  # leave no half-written OUT behind (it was empty or absent)
        _remove_contents(out, created)
        raise
    return {"from": src_format, "to": dst_format, "source": str(src), "out": str(out), "copy_images": copy_images,
            "class_names": next(iter(splits.values())).class_names, **written,
            "findings": {"errors": len(errors), "warnings": len(findings) - len(errors),
                         "by_kind": dict(sorted(Counter(f.kind for f in findings).items()))},
            "forced_errors": [f"[{f.kind}] {f}" for f in errors],
            "skipped_images": sorted(str(p) for p in unusable)}


def format_summary(summary: dict[str, Any]) -> str:
    """The CLI's report of a conversion."""
    how = "copied" if summary["copy_images"] else "linked"
    lines = [f"converted {summary['from']} -> {summary['to']}: {summary['images']} images ({how}), "
             f"{summary['boxes']} boxes, {len(summary['class_names'])} classes -> {summary['out']}"]
    if summary.get("ignored_left_out"):
        lines.append(f"left out {summary['ignored_left_out']} ignore boxes (COCO crowd / VOC difficult): "
                     "YOLO labels have no ignore regions")
    if summary["forced_errors"]:
        lines.append(f"--force: converted despite {len(summary['forced_errors'])} errors (defective boxes and "
                     f"{len(summary['skipped_images'])} unusable images left out):")
        lines += [f"  - {e}" for e in summary["forced_errors"][:MAX_LISTED]]
    if summary.get("not_in_yaml"):
        lines.append(f"splits not named in dataset.yaml: {', '.join(summary['not_in_yaml'])}")
    lines.append(f"train on it: detpact train {shlex.quote(summary['out'])}   (or set data.path in a config)")
    return "\n".join(lines)


# --- reading ----------------------------------------------------------------------------


def read_source(fmt: str, src: Path, images: str | Path | None,
                classes: list[str] | None) -> tuple[dict[str, Annotations], list[Path]]:
    """({split: Annotations}, the folders read) of a dataset in format `fmt`."""
    if fmt == "coco":
        if not src.is_file():
            raise DetpactError(f"COCO annotation file not found: {src}. SRC must be the JSON file.")
        image_root = Path(images) if images else coco_image_root(src)
        read = read_coco(src, image_root)
        if classes and list(classes) != read.class_names:
            raise DetpactError(f"--classes {classes} differs from the categories of {src} {read.class_names}: "
                               "leave --classes out for a COCO source.")
        return {"": read}, [src.parent, image_root]
    if fmt == "voc":
        xml_dir, image_dir = voc_dirs(src, images)
        return {"": read_voc(xml_dir, image_dir, classes)}, [src, xml_dir, image_dir]
    if images:
        raise DetpactError("--images applies to --from coco and voc; a YOLO source has its images/ folder "
                           "(or the dataset YAML names them).")
    return _read_yolo_source(src, classes)


def _read_yolo_source(src: Path, classes: list[str] | None) -> tuple[dict[str, Annotations], list[Path]]:
    """A dataset YAML's train/val, or a folder's splits (`yolo_folder_splits`; images/
    itself is the split "", written without a folder level) with classes.txt."""
    if src.is_file():
        root, sources, names = read_dataset_yaml(src)
        return read_yolo_sources(root, sources, list(classes or names), "yolo").splits, [src.parent, root]
    if not (src / "images").is_dir():
        raise DetpactError(f"YOLO source {src} is neither a dataset YAML nor a folder with images/ and labels/.")
    return read_yolo_sources(src, yolo_folder_splits(src, flat_name=""), classes, "yolo").splits, [src]


def _refusal(src: Path, errors: list[Finding]) -> str:
    return (f"Not converting {src}: reading it found {len(errors)} errors:\n{list_findings(errors, MAX_LISTED)}\n"
            "Fix the files named, or pass --force to convert what is readable (defective boxes and unusable images "
            "are left out and listed in the summary).")


def _check_outside_source(out: Path, folders: list[Path]) -> None:
    target = out.resolve()  # `..` and symlinks resolved: OUT cannot reach into SRC through them
    for folder in folders:
        folder = folder.resolve()
        if target == folder or folder in target.parents or target in folder.parents:
            raise DetpactError(f"Output folder {out} overlaps the source folder {folder}: convert never writes into "
                               "its source. Choose an OUT outside it.")


# --- writing ----------------------------------------------------------------------------


def write_yolo(annotations: Annotations | Mapping[str, Annotations], out_dir: Path,
               copy_images: bool = False) -> dict[str, Any]:
    """Write a YOLO dataset into `out_dir` (see the module docstring for the layout);
    a plain `Annotations` is one split without a folder level. Returns the counts."""
    splits = annotations if isinstance(annotations, Mapping) else {"": annotations}
    out_dir = Path(out_dir)
    names = next(iter(splits.values())).class_names
    counts = {"images": 0, "boxes": 0, "ignored_left_out": 0, "splits": {}}
    for split, split_annotations in splits.items():
        image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split
        placed = place_images(split_annotations.samples, image_dir, copy_images)
        split_counts = {"images": len(placed), "boxes": 0, "ignored_left_out": 0}
        for sample in placed:
            label_path = (label_dir / sample.image_path.relative_to(image_dir)).with_suffix(".txt")
            label_path.parent.mkdir(parents=True, exist_ok=True)
            lines = yolo_lines(sample)
            label_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            split_counts["boxes"] += len(lines)
            split_counts["ignored_left_out"] += len(sample.labels) - len(lines)
        counts["splits"][split] = split_counts
        for key in ("images", "boxes", "ignored_left_out"):
            counts[key] += split_counts[key]
    (out_dir / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    dataset = {"path": str(out_dir.resolve())}
    keys = _yaml_keys(list(splits))
    dataset.update({key: (Path("images") / split).as_posix() for split, key in keys.items()})
    dataset["names"] = dict(enumerate(names))
    (out_dir / "dataset.yaml").write_text(yaml.safe_dump(dataset, sort_keys=False, allow_unicode=True),
                                          encoding="utf-8")
    counts["not_in_yaml"] = [split for split in splits if split not in keys]
    return counts


def yolo_lines(sample: Sample) -> list[str]:
    """`class cx cy w h` lines (normalised, repr precision) of the sample's boxes, ignore
    boxes left out."""
    keep = ~sample.ignore if sample.ignore is not None else np.ones(len(sample.labels), dtype=bool)
    lines = []
    for (x1, y1, x2, y2), label in zip(sample.boxes[keep].astype(np.float64).tolist(), sample.labels[keep].tolist()):
        # cx is halved before dividing so that a box at x1 = 0 reads back as exactly 0
        values = ((x1 + x2) / 2 / sample.width, (y1 + y2) / 2 / sample.height,
                  (x2 - x1) / sample.width, (y2 - y1) / sample.height)
        lines.append(" ".join([str(int(label)), *(repr(v) for v in values)]))
    return lines


def _yaml_keys(splits: list[str]) -> dict[str, str]:
    """Which split goes to the dataset YAML's train / val / test: a split named so (or
    starting so, like train2017 / valid); a single split is `train`."""
    if len(splits) == 1:
        return {splits[0]: "train"}
    keys: dict[str, str] = {}
    for split in splits:
        key = next((k for k in ("train", "val", "test") if split.startswith(k)), None)
        if key is not None and key not in keys.values():
            keys[split] = key
    return keys


def write_coco(annotations: Annotations, out_json: Path, image_root: Path) -> dict[str, Any]:
    """Write one COCO detection JSON: image file_names relative to `image_root` (recorded
    as info.image_root, relative to the JSON's folder when it is inside the dataset
    folder above it), category ids 1..N in class order, bbox floats unrounded, area =
    box area, iscrowd = ignore. Returns the counts."""
    out_json, image_root = Path(out_json), Path(image_root)
    images, boxes = [], []
    for image_id, sample in enumerate(annotations.samples, start=1):
        if not sample.image_path.is_relative_to(image_root):
            raise DetpactError(f"Image {sample.image_path} is not under the COCO image root {image_root}.")
        images.append({"id": image_id, "file_name": sample.image_path.relative_to(image_root).as_posix(),
                       "width": int(sample.width), "height": int(sample.height)})
        ignore = sample.ignore if sample.ignore is not None else np.zeros(len(sample.labels), dtype=bool)
        for (x1, y1, x2, y2), label, crowd in zip(sample.boxes.astype(np.float64).tolist(), sample.labels.tolist(),
                                                  ignore.tolist()):
            w, h = x2 - x1, y2 - y1
            boxes.append({"id": len(boxes) + 1, "image_id": image_id, "category_id": int(label) + 1,
                          "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd)})
    inside = image_root.resolve().is_relative_to(out_json.parent.parent.resolve())
    root = os.path.relpath(image_root.resolve(), out_json.parent.resolve()) if inside else str(image_root.resolve())
    data = {"info": {"description": "written by detpact data convert", "image_root": Path(root).as_posix()},
            "licenses": [], "images": images, "annotations": boxes,
            "categories": [{"id": i, "name": name, "supercategory": ""}
                           for i, name in enumerate(annotations.class_names, start=1)]}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_json, json.dumps(data) + "\n")  # compact: COCO files get large
    return {"images": len(images), "boxes": len(boxes), "crowd": sum(b["iscrowd"] for b in boxes)}


def _write_coco_dataset(splits: Mapping[str, Annotations], out: Path, copy_images: bool) -> dict[str, Any]:
    counts: dict[str, Any] = {"images": 0, "boxes": 0, "splits": {}, "annotation_files": []}
    for split, split_annotations in splits.items():
        image_dir = out / "images" / split
        placed = place_images(split_annotations.samples, image_dir, copy_images)
        json_path = out / "annotations" / (f"instances_{split}.json" if split else "instances.json")
        written = write_coco(dataclasses.replace(split_annotations, samples=placed), json_path, image_dir)
        counts["splits"][split] = written
        counts["annotation_files"].append(str(json_path))
        counts["images"] += written["images"]
        counts["boxes"] += written["boxes"]
    return counts


def place_images(samples: list[Sample], image_dir: Path, copy: bool) -> list[Sample]:
    """Link (or copy) each sample's image to `image_dir / <rel>`, rel being its path below
    the samples' common folder; returns the samples pointing at the new paths. Two images
    that would share a path, or a YOLO label file (same stem), are an error."""
    if not samples:
        return []
    sources = [Path(os.path.abspath(s.image_path)) for s in samples]  # `..` folded, symlinks kept (their names)
    common = Path(os.path.commonpath([p.parent for p in sources]))
    placed, stems = [], {}
    for sample, source in zip(samples, sources):
        target = image_dir / source.relative_to(common)
        stem = target.with_suffix("")
        if stem in stems:
            raise DetpactError(f"Images {stems[stem]} and {source} would share the output name {stem.name}.*: "
                               "rename one of them (YOLO pairs labels to images by name).")
        stems[stem] = source
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if copy:
                shutil.copy2(source, target)
            else:
                target.symlink_to(source.resolve())
        except OSError as exc:
            hint = "" if copy else " (this file system may not support symlinks: use --copy-images)"
            raise DetpactError(f"Cannot place image {source} at {target}: {exc}{hint}.") from None
        placed.append(dataclasses.replace(sample, image_path=target))
    return placed


def _remove_contents(out: Path, created: bool) -> None:
    """Undo a failed conversion: `out` was absent (`created`) or empty before it."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
