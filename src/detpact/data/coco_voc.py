"""COCO JSON and Pascal VOC XML annotations, read into `Sample` records plus `Finding`s
(see formats.py for the rules every reader follows).

Coordinates: COCO boxes are `[x, y, w, h]` in pixels and map to xyxy directly. VOC
boxes are 1-based pixel indices (`xmin = 1` is the first column); like Detectron2 we
map them to continuous xyxy as `(xmin - 1, ymin - 1, xmax, ymax)`.
COCO `iscrowd` regions and VOC `difficult` objects are kept with `ignore` set: they
are neither trained on nor counted as misses by evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

from detpact.data.formats import Annotations, Finding, dedup_rows, sample_from_rows
from detpact.errors import DetpactError

# A box may poke out of its image by this many pixels (annotation tools round) before
# it counts as outside; it is clipped either way.
OUTSIDE_TOLERANCE_PX = 1.0


def read_coco(json_path: Path, image_root: Path) -> Annotations:
    """Read a COCO detection JSON; image files are `image_root / file_name`.

    Category ids may be any integers: class id i is the i-th category by ascending id.
    Samples come in ascending image id order, one per listed image (with or without
    annotations).
    """
    data = _load_coco_json(json_path)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_of = {category["id"]: index for index, category in enumerate(categories)}
    result = Annotations([str(category["name"]) for category in categories])
    if len(class_of) != len(categories):
        raise DetpactError(f"{json_path}: two categories share an id. Give every category its own id.")

    images: dict[Any, dict] = {}
    for image in data["images"]:
        if image.get("id") in images:
            result.findings.append(Finding("duplicate_image", json_path, f"image id {image.get('id')}",
                                           "a second image entry with this id; only the first is used"))
            continue
        images[image.get("id")] = image
    rows: dict[Any, list[tuple[float, float, float, float, int, bool]]] = {image_id: [] for image_id in images}
    paths = {image_id: Path(image_root) / str(image["file_name"]) for image_id, image in images.items()}
    for ann in data["annotations"]:
        where = f"annotation id {ann.get('id')}"
        image = images.get(ann.get("image_id"))
        if image is None:
            result.findings.append(Finding("unknown_image", json_path, where,
                                           f"image_id {ann.get('image_id')!r} is not in 'images'"))
            continue
        path = paths[ann["image_id"]]
        if ann.get("category_id") not in class_of:
            result.findings.append(Finding("unknown_class", json_path, where,
                                           f"category_id {ann.get('category_id')!r} is not in 'categories'", path))
            continue
        box = _coco_box(ann.get("bbox"))
        if box is None:
            result.findings.append(Finding("bad_box", json_path, where,
                                           f"bbox {ann.get('bbox')!r} is not [x, y, w, h] with w, h > 0", path))
            continue
        box = _inside(box, image["width"], image["height"], json_path, where, path, result.findings)
        if box is None:
            continue
        rows[ann["image_id"]].append((*box, class_of[ann["category_id"]], bool(ann.get("iscrowd", 0))))

    for image_id in sorted(images, key=lambda i: (str(type(i)), i)):
        image = images[image_id]
        kept = dedup_rows(rows[image_id], json_path, f"image {image['file_name']}", paths[image_id], result.findings)
        result.samples.append(sample_from_rows(paths[image_id], int(image["width"]), int(image["height"]), kept))
    return result


def read_voc(annotation_dir: Path, image_dir: Path, class_names: list[str] | None = None) -> Annotations:
    """Read every `*.xml` of a Pascal VOC annotation folder; images are `image_dir / <filename>`.

    With `class_names`, an object of another name is a finding; without, the classes
    are the sorted set of names found.
    """
    files = sorted(Path(annotation_dir).glob("*.xml"))
    if not files:
        raise DetpactError(f"No Pascal VOC annotations (*.xml) in {annotation_dir}. Point the dataset at the "
                           "folder holding the XML files.")
    parsed = [(path, _parse_voc_xml(path)) for path in files]
    names = list(class_names) if class_names else sorted({obj["name"] for _, doc in parsed for obj in doc["objects"]})
    class_of = {name: index for index, name in enumerate(names)}
    result = Annotations(names)
    for path, doc in parsed:
        image = Path(image_dir) / doc["filename"]
        rows = []
        for index, obj in enumerate(doc["objects"], start=1):
            where = f"object {index}"
            if obj["name"] not in class_of:
                result.findings.append(Finding("unknown_class", path, where,
                                               f"class {obj['name']!r} is not one of the dataset's classes", image))
                continue
            box = obj["box"]
            if box is None:
                result.findings.append(Finding("bad_box", path, where, "bndbox needs numeric xmin < xmax, ymin < ymax",
                                               image))
                continue
            box = _inside(box, doc["width"], doc["height"], path, where, image, result.findings)
            if box is None:
                continue
            rows.append((*box, class_of[obj["name"]], obj["difficult"]))
        kept = dedup_rows(rows, path, None, image, result.findings)
        result.samples.append(sample_from_rows(image, doc["width"], doc["height"], kept))
    return result


def _load_coco_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetpactError(f"COCO annotation file not found: {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetpactError(f"{path} is not readable JSON ({exc}). Check the annotation file.") from None
    missing = [key for key in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(key), list)]
    if missing:
        raise DetpactError(f"{path} is not a COCO detection file: it needs the lists {', '.join(missing)}.")
    for key, fields in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name"))):
        for entry in data[key]:
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise DetpactError(f"{path}: every entry of '{key}' needs {', '.join(fields)}; found {entry!r}.")
    return data


def _coco_box(bbox: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return x, y, x + w, y + h


def _parse_voc_xml(path: Path) -> dict:
    try:
        # defusedxml: annotation files are untrusted input (no entity expansion, no DTDs)
        root = defusedxml.ElementTree.parse(path).getroot()
    except (ParseError, DefusedXmlException, OSError) as exc:
        raise DetpactError(f"{path} is not readable Pascal VOC XML ({exc}). Fix or remove the file.") from None
    try:
        filename = root.findtext("filename", "").strip()
        width, height = int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        raise DetpactError(f"{path}: a VOC annotation needs <filename> and a numeric <size><width>/<height>.") from None
    if not filename or width <= 0 or height <= 0:
        raise DetpactError(f"{path}: a VOC annotation needs <filename> and a positive <size><width>/<height>.")
    objects = []
    for obj in root.iter("object"):
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            box = (xmin - 1, ymin - 1, xmax, ymax) if xmin <= xmax and ymin <= ymax else None
        except (TypeError, ValueError):
            box = None
        if box is not None and not all(math.isfinite(v) for v in box):
            box = None
        objects.append({"name": (obj.findtext("name") or "").strip(), "box": box,
                        "difficult": (obj.findtext("difficult") or "0").strip() == "1"})
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def _inside(box: tuple[float, float, float, float], width: float, height: float, path: Path, where: str | None,
            image: Path, findings: list[Finding]) -> tuple[float, float, float, float] | None:
    """`box` clipped to the image, with a finding when it was outside by more than the
    tolerance; None (and a finding) when nothing of it is inside."""
    x1, y1, x2, y2 = box
    clipped = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    shown = [round(v, 2) for v in box]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        findings.append(Finding("bad_box", path, where, f"box {shown} lies outside the {width}x{height} image", image))
        return None
    tol = OUTSIDE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        findings.append(Finding("box_outside_image", path, where,
                                f"box {shown} extends outside the {width}x{height} image; clipped", image))
    return clipped
