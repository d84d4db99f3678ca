"""The confusion matrix of a detector at one operating point.

COCO AP and the operating point (evaluation/operating.py) match detections to ground
truth of their own class only, so they cannot say *which* class a wrong detection took
an object for. Here a detection may match a box of any class: per image, the detections
scoring at least `score_threshold`, best first, each take the unmatched box they overlap
most with IoU >= `iou_threshold`. A match counts in [predicted, true]; a detection that
matches nothing counts in [predicted, background] (a false positive), a box that nothing
matched in [background, true] (a miss). As in COCO, crowd boxes (ignore regions) are never
missed, and a detection that matches none but lies on a crowd box is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detpact.evaluation.records import ImageDetections, ImageGT


def confusion_matrix(gts: Sequence[ImageGT], dets: Sequence[ImageDetections], num_classes: int,
                     score_threshold: float = 0.25, iou_threshold: float = 0.5) -> np.ndarray:
    """[C + 1, C + 1] counts, rows = predicted class, columns = true class; index C is
    the background (row C: missed boxes, column C: detections on nothing). `dets` are
    looked up by image_id, so the two lists need not be aligned."""
    background = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    by_id = {d.image_id: d for d in dets}
    for gt in gts:
        crowd = np.zeros(len(gt.labels), bool) if gt.iscrowd is None else np.asarray(gt.iscrowd, bool)
        boxes, labels = np.asarray(gt.boxes, np.float64).reshape(-1, 4), np.asarray(gt.labels, np.int64)
        det = by_id.get(gt.image_id)
        taken = np.zeros(len(labels), bool)
        if det is not None:
            confident = np.asarray(det.scores) >= score_threshold
            order = np.argsort(-np.asarray(det.scores)[confident], kind="stable")
            det_boxes = np.asarray(det.boxes, np.float64).reshape(-1, 4)[confident][order]
            det_labels = np.asarray(det.labels, np.int64)[confident][order]
            ious = box_iou(det_boxes, boxes, crowd)  # [D, G]
            for i, predicted in enumerate(det_labels):
                free = np.where(~taken & ~crowd, ious[i], -1.0)
                j = int(free.argmax()) if len(free) else -1
                if j >= 0 and free[j] >= iou_threshold:
                    taken[j] = True
                    matrix[predicted, labels[j]] += 1
                elif not (crowd.any() and ious[i][crowd].max() >= iou_threshold):
                    matrix[predicted, background] += 1
        np.add.at(matrix[background], labels[~taken & ~crowd], 1)
    return matrix


def box_iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """[N, M] IoU of xyxy boxes a [N, 4] and b [M, 4] (0 where the union is empty);
    against a crowd box of b, the share of the box of a inside it (COCO's rule)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)[:, None]
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)[None, :]
    union = area_a + area_b - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, bool)[None, :], area_a, union)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
