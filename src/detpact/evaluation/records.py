"""Our per-image records (ImageGT, ImageDetections) as COCO dicts, with numpy.

Ground truth becomes a COCO GT dict (category id = class id + 1, bbox xywh, area = w * h);
detections become the annotations pycocotools' `loadRes` would make of a results list,
ranked by content so that tied scores do not depend on arrival order (evaluation/coco.py
explains why). Every input is checked first: finite xyxy boxes, class ids in range, unique
ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detpact.errors import DetpactError


@dataclass
class ImageGT:
    """One image's ground truth, in original-image pixel coordinates."""

    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float xyxy pixels
    labels: np.ndarray  # [N] int, contiguous class ids 0..C-1
    iscrowd: np.ndarray | None = None  # [N] bool: ignore regions (COCO crowd, VOC difficult)


@dataclass
class ImageDetections:
    """One image's detections, in original-image pixel coordinates."""

    image_id: int
    boxes: np.ndarray  # [K, 4] float xyxy pixels
    scores: np.ndarray  # [K]
    labels: np.ndarray  # [K] int class ids 0..C-1


def to_coco_gt(gts: list[ImageGT], class_names: list[str]) -> dict:
    """COCO GT dict: category id = class id + 1, bbox xywh, area = w * h, iscrowd from
    `ImageGT.iscrowd` (0 when it is None)."""
    if len(set(class_names)) != len(class_names):
        raise DetpactError(f"class names must be unique, got {class_names}")
    images, columns = [], []
    for g in gts:
        boxes, labels = _checked_boxes(g.image_id, g.boxes, g.labels, len(class_names), "ground truth")
        images.append({"id": int(g.image_id), "width": int(g.width), "height": int(g.height)})
        crowd = np.zeros(len(boxes), bool) if g.iscrowd is None else np.asarray(g.iscrowd, bool).reshape(-1)
        if len(crowd) != len(boxes):
            raise DetpactError(f"image {g.image_id}: ground truth needs one iscrowd flag per box")
        columns.append((np.full(len(boxes), int(g.image_id), np.int64), labels, boxes, crowd))
    check_unique([img["id"] for img in images], "ground-truth image ids")
    image_ids, labels, boxes, crowd = _concatenated(columns)
    x, y = boxes[:, 0], boxes[:, 1]
    w, h = boxes[:, 2] - x, boxes[:, 3] - y
    annotations = [
        # ids start at 1: pycocotools reads id 0 as "unmatched"
        {"id": i, "image_id": img, "category_id": cat, "bbox": [x1, y1, bw, bh], "area": area, "iscrowd": is_crowd}
        for i, img, cat, x1, y1, bw, bh, area, is_crowd in zip(
            range(1, len(boxes) + 1), image_ids.tolist(), (labels + 1).tolist(), x.tolist(), y.tolist(),
            w.tolist(), h.tolist(), (w * h).tolist(), crowd.astype(np.int64).tolist(),
        )
    ]  # fmt: skip
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(class_names)]
    return {"images": images, "categories": categories, "annotations": annotations}


def to_coco_results(dets: list[ImageDetections], num_classes: int) -> list[dict]:
    """COCO results list (bbox xywh), ranked by (-score, image_id, label, x1, y1, x2, y2).

    pycocotools ranks equal scores by input order; ranking ties by content instead
    makes the result independent of the order the detections arrive in.
    """
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": a["score"]}
        for a in detection_annotations(*ranked_detections(dets, num_classes))
    ]


def ranked_detections(
    dets: list[ImageDetections], num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All detections as (image_ids [K], labels [K], boxes [K, 4] xyxy, scores [K]),
    ranked by (-score, image_id, label, x1, y1, x2, y2); exact duplicates keep input order."""
    columns = []
    for d in dets:
        boxes, labels = _checked_boxes(d.image_id, d.boxes, d.labels, num_classes, "detections")
        scores = np.asarray(d.scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes) or not np.isfinite(scores).all():
            raise DetpactError(f"image {d.image_id}: detections need one finite score per box")
        columns.append((np.full(len(boxes), int(d.image_id), np.int64), labels, boxes, scores))
    image_ids, labels, boxes, scores = _concatenated(columns)
    # np.lexsort is stable and sorts by its last key first.
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, image_ids, -scores))
    return image_ids[order], labels[order], boxes[order], scores[order]


def detection_annotations(
    image_ids: np.ndarray, labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray
) -> list[dict]:
    """Detections as the annotations `loadRes` makes of results: bbox xywh, area = w * h,
    id = rank + 1, iscrowd 0, category id = label + 1."""
    x, y = boxes[:, 0], boxes[:, 1]
    w, h = boxes[:, 2] - x, boxes[:, 3] - y
    return [
        {"id": i, "image_id": img, "category_id": cat, "bbox": [x1, y1, bw, bh], "score": s, "area": area, "iscrowd": 0}
        for i, img, cat, x1, y1, bw, bh, s, area in zip(
            range(1, len(boxes) + 1), image_ids.tolist(), (labels + 1).tolist(), x.tolist(), y.tolist(),
            w.tolist(), h.tolist(), scores.tolist(), (w * h).tolist(),
        )
    ]  # fmt: skip


def result_annotations(results: list[dict]) -> list[dict]:
    """A COCO results list as new annotation dicts, in its order, as `loadRes` makes them
    (area = w * h of the bbox, ids from 1, iscrowd 0); the caller's dicts are not touched."""
    try:
        return [
            {"id": i, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
             "score": r["score"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
            for i, r in enumerate(results, start=1)
        ]  # fmt: skip
    except (KeyError, TypeError, IndexError) as e:
        raise DetpactError(f"each COCO result needs image_id, category_id, bbox and score ({e!r})") from None


def _concatenated(columns: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Per-image (image_ids, labels, boxes, extra) columns joined; empty arrays when there are none."""
    if not columns:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0)
    return tuple(np.concatenate(column) for column in zip(*columns, strict=True))


def _checked_boxes(
    image_id: int, boxes: np.ndarray, labels: np.ndarray, num_classes: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # [N, 4] xyxy
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(boxes):
        raise DetpactError(f"image {image_id}: {what} has {len(boxes)} boxes but {len(labels)} labels")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise DetpactError(f"image {image_id}: {what} boxes must be finite xyxy with x2 >= x1 and y2 >= y1")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DetpactError(
            f"image {image_id}: {what} class ids must lie in 0..{num_classes - 1}, got {sorted(set(labels.tolist()))}"
        )
    return boxes, labels.astype(np.int64)


def check_unique(values: list, what: str) -> None:
    seen, dupes = set(), set()
    for v in values:
        (dupes if v in seen else seen).add(v)
    if dupes:
        raise DetpactError(f"{what} must be unique; repeated: {sorted(dupes, key=str)[:10]}")
