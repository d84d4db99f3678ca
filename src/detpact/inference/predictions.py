"""The predictions file: detpact's versioned JSON schema, reading it from the forms users
have, checking every entry, and converting to and from COCO results JSON.

Version 1 (docs/predictions.md):

    {"schema": "detpact.predictions", "version": 1, "meta": {...},
     "predictions": [{"image": "path/a.jpg", "image_id": 7, "width": 640, "height": 480,
                      "detections": [{"box": [x1, y1, x2, y2], "score": 0.91,
                                      "class_id": 0, "class_name": "cat"}]}]}

`box` is in pixels of the original image, corners (xyxy). An image is named by `image`
(a path), `image_id`, or both. Accepted on reading as well: the wrapped form without
`schema`/`version` (`{"predictions": [...], "meta": {...}}`), the bare list of image
entries, and boxes in another layout (`bbox_format`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from detpact.errors import DetpactError

SCHEMA = "detpact.predictions"
VERSION = 1
BBOX_FORMATS = ("xyxy", "xywh", "cxcywh", "cxcywh_norm")
BBoxFormat = Literal["xyxy", "xywh", "cxcywh", "cxcywh_norm"]
_MAX_LISTED = 20  # errors listed in one message


class Detection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    box: tuple[float, float, float, float]
    score: float = Field(ge=0.0, le=1.0)
    class_id: int = Field(ge=0)
    class_name: str | None = None


class ImagePredictions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    image_id: int | str | None = None
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    detections: list[Detection]

    @field_validator("detections")
    @classmethod
    def _boxes_are_corners(cls, detections: list[Detection]) -> list[Detection]:
        for index, det in enumerate(detections):
            x1, y1, x2, y2 = det.box
            if not x2 >= x1 or not y2 >= y1:
                raise ValueError(f"detections[{index}].box {list(det.box)} has x2 < x1 or y2 < y1")
        return detections


def to_xyxy(box: Sequence[float], fmt: str, width: float, height: float) -> list[float]:
    """A box in `fmt` (one of BBOX_FORMATS; cxcywh_norm is relative to the image size) as
    pixel corners."""
    a, b, c, d = (float(v) for v in box)
    if fmt == "xyxy":
        return [a, b, c, d]
    if fmt == "xywh":
        return [a, b, a + c, b + d]
    if fmt == "cxcywh_norm":
        a, b, c, d = a * width, b * height, c * width, d * height
    return [a - c / 2, b - d / 2, a + c / 2, b + d / 2]


def read_predictions(path: Path, bbox_format: str = "xyxy") -> tuple[list[ImagePredictions], dict[str, Any]]:
    """The image entries and meta of a predictions file, every entry checked. Raises a
    DetpactError listing each problem with its entry index and field."""
    if bbox_format not in BBOX_FORMATS:
        raise DetpactError(f"Unknown --bbox-format {bbox_format!r}: use one of {', '.join(BBOX_FORMATS)}.")
    document = load_json(Path(path), "a detpact predictions file")
    entries, meta = _unwrap(document, path)
    images: list[ImagePredictions] = []
    problems: list[str] = []
    for index, entry in enumerate(entries):
        try:
            images.append(ImagePredictions.model_validate(_normalised(entry, bbox_format)))
        except ValidationError as exc:
            problems += [f"predictions[{index}]{_where(error['loc'])}: {error['msg']}" for error in exc.errors()]
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"predictions[{index}]: {exc}")
        else:
            if images[-1].image is None and images[-1].image_id is None:
                problems.append(f"predictions[{index}]: names no image: give 'image' (a path) or 'image_id'")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DetpactError(f"{path} has {len(problems)} problem(s) (docs/predictions.md has the schema):\n"
                           f"{listed}{more}")
    return images, meta


def load_json(path: Path, what: str) -> Any:
    """The JSON document at `path`; a DetpactError naming the file and `what` it should be
    when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetpactError(f"File not found: {path}. Pass {what}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetpactError(f"{path} is not valid JSON ({exc}). Pass {what}.") from None


def write_predictions(path: Path, images: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
    """Write image entries (ImagePredictions fields) as a version-1 predictions file."""
    document = {"schema": SCHEMA, "version": VERSION, "meta": dict(meta), "predictions": list(images)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def to_coco_results(images: Sequence[ImagePredictions], image_ids: Mapping[str, int],
                    category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """COCO results JSON entries ({image_id, category_id, bbox [x, y, w, h], score}).

    image_ids: an image's path or file name -> its COCO id (used when an entry has no
    integer image_id). category_ids: COCO category id of each class id (default: the
    class id itself)."""
    results = []
    for number, image in enumerate(images):
        image_id = _coco_image_id(image, image_ids, number)
        for det in image.detections:
            x1, y1, x2, y2 = det.box
            category = category_ids[det.class_id] if category_ids is not None else det.class_id
            results.append({"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": det.score})
    return results


def from_coco_results(results: Sequence[Mapping[str, Any]], gt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Image entries (version 1) from COCO results JSON and its ground-truth file (for the
    image sizes and file names, and the category names; class ids follow the sorted
    category ids)."""
    categories = sorted(gt.get("categories", []), key=lambda c: c["id"])
    class_of = {c["id"]: index for index, c in enumerate(categories)}
    names = [c["name"] for c in categories]
    entries = {img["id"]: {"image": img.get("file_name"), "image_id": img["id"], "width": img["width"],
                           "height": img["height"], "detections": []} for img in gt.get("images", [])}
    for index, result in enumerate(results):
        if result.get("image_id") not in entries:
            raise DetpactError(f"COCO results entry {index}: image_id {result.get('image_id')!r} is not in the "
                               "ground-truth file's images.")
        if result.get("category_id") not in class_of:
            raise DetpactError(f"COCO results entry {index}: category_id {result.get('category_id')!r} is not in "
                               "the ground-truth file's categories.")
        x, y, w, h = result["bbox"]
        class_id = class_of[result["category_id"]]
        entries[result["image_id"]]["detections"].append(
            {"box": [x, y, x + w, y + h], "score": result["score"], "class_id": class_id, "class_name": names[class_id]})
    return list(entries.values())


def coco_results_for(path: Path, gt: Mapping[str, Any], bbox_format: str = "xyxy") -> list[dict[str, Any]]:
    """COCO results JSON entries for the ground truth `gt` from `path`: a COCO results file
    as it is, or a detpact predictions file converted (images matched by id, path or file
    name; class ids mapped to the sorted category ids)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        document = None  # read_predictions says what is wrong
    if isinstance(document, list) and document and isinstance(document[0], dict) and "bbox" in document[0]:
        return document
    return coco_results_against(read_predictions(path, bbox_format)[0], gt)


def coco_results_against(images: Sequence[ImagePredictions], gt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`to_coco_results` for the COCO ground truth `gt`: images matched by id, path or file
    name; class ids mapped to the sorted category ids."""
    ids = {key: img["id"] for img in gt.get("images", [])
           for key in (img.get("file_name"), Path(img.get("file_name") or "").name) if key}
    categories = [c["id"] for c in sorted(gt.get("categories", []), key=lambda c: c["id"])]
    return to_coco_results(images, ids, categories)


def _unwrap(document: Any, path: Path) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(document, list):
        return document, {}
    if not isinstance(document, dict):
        raise DetpactError(f"{path}: expected a JSON object with 'predictions' or a list of image entries.")
    version = document.get("version", VERSION)
    if document.get("schema", SCHEMA) != SCHEMA or not isinstance(version, int) or version > VERSION:
        raise DetpactError(f"{path}: schema {document.get('schema')!r} version {version!r} is not one this "
                           f"detpact reads ({SCHEMA} up to version {VERSION}). Upgrade detpact.")
    entries = document.get("predictions", document.get("images"))  # "images": files written before version 1
    if not isinstance(entries, list):
        raise DetpactError(f"{path}: 'predictions' must be a list of image entries.")
    meta = document.get("meta") or {k: v for k, v in document.items() if k not in ("images", "predictions")}
    return entries, meta


def _normalised(entry: Any, bbox_format: str) -> Any:
    """An entry with its boxes as pixel corners under the key `box` (older files: box_xyxy)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("detections"), list):
        return entry  # the schema says what is wrong
    detections = []
    for det in entry["detections"]:
        if isinstance(det, dict):
            det = dict(det)
            if "box_xyxy" in det and "box" not in det:
                det["box"] = det.pop("box_xyxy")
            elif bbox_format != "xyxy" and isinstance(det.get("box"), list) and len(det["box"]) == 4:
                det["box"] = to_xyxy(det["box"], bbox_format, entry.get("width") or 0, entry.get("height") or 0)
        detections.append(det)
    return {**entry, "detections": detections}


def _where(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _coco_image_id(image: ImagePredictions, image_ids: Mapping[str, int], number: int) -> int:
    if isinstance(image.image_id, int):
        return image.image_id
    for key in _image_keys(image):
        if key in image_ids:
            return image_ids[key]
    raise DetpactError(f"predictions[{number}] ({image.image or image.image_id}) is not an image of the ground truth.")


def _image_keys(image: ImagePredictions) -> Iterator[str]:
    if image.image is not None:
        yield image.image
        yield Path(image.image).name
    if image.image_id is not None:
        yield str(image.image_id)
