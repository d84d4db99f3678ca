"""Operating-point metrics: what a deployed detector does at one score threshold.

COCO AP averages over every threshold; a deployment picks one. At `score_threshold`
detections are matched to ground truth per image and class, best score first, each to
the unmatched box it overlaps most with IoU >= `iou_threshold` (COCO's greedy rule).
Detections on crowd regions (ignore boxes) are neither true nor false positives, and
crowd boxes are never missed. Reported: precision, recall, F1, the mean IoU of the
matches, per-class figures, and an IoU sweep (the same at IoU .50:.05:.95).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detpact.evaluation.coco import ImageDetections, ImageGT

SWEEP = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def operating_point(gts: Sequence[ImageGT], dets: Sequence[ImageDetections], class_names: Sequence[str],
                    score_threshold: float = 0.25, iou_threshold: float = 0.5) -> dict:
    """Precision / recall / F1 / mean matched IoU at one score and IoU threshold, per class
    and overall, plus the IoU sweep. `dets[i]` and `gts[i]` need not be aligned: both are
    looked up by image_id. Values are None where undefined (nothing predicted / no GT)."""
    thresholds = np.array(sorted({*SWEEP, iou_threshold}))
    num_classes = len(class_names)
    tp = np.zeros((len(thresholds), num_classes), np.int64)
    fp = np.zeros_like(tp)
    num_gt = np.zeros(num_classes, np.int64)
    iou_sum = np.zeros(num_classes)
    by_id = {d.image_id: d for d in dets}
    at = int(np.searchsorted(thresholds, iou_threshold))  # the operating IoU's row
    for gt in gts:
        det = by_id.get(gt.image_id)
        crowd = np.zeros(len(gt.labels), bool) if gt.iscrowd is None else np.asarray(gt.iscrowd, bool)
        np.add.at(num_gt, gt.labels[~crowd], 1)
        if det is None:
            continue
        confident = det.scores >= score_threshold
        for c in np.unique(det.labels[confident]):
            g, d = gt.labels == c, confident & (det.labels == c)
            order = np.argsort(-det.scores[d], kind="stable")
            matched, ignored, ious = _match(det.boxes[d][order], gt.boxes[g], crowd[g], thresholds)
            tp[:, c] += matched.sum(1)
            fp[:, c] += (~matched & ~ignored).sum(1)
            iou_sum[c] += ious[at][matched[at]].sum()
    per_class = {name: _prf(tp[at, c], fp[at, c], num_gt[c], iou_sum[c]) for c, name in enumerate(class_names)}
    overall = _prf(tp[at].sum(), fp[at].sum(), num_gt.sum(), iou_sum.sum())
    sweep = [{"iou": float(t), **_prf(tp[i].sum(), fp[i].sum(), num_gt.sum())} for i, t in enumerate(thresholds)
             if float(t) in SWEEP]
    for row in sweep:
        row.pop("mean_iou")
    return {"score_threshold": score_threshold, "iou_threshold": iou_threshold, **overall,
            "per_class": per_class, "iou_sweep": sweep}


def _match(boxes: np.ndarray, gt_boxes: np.ndarray, crowd: np.ndarray, thresholds: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching of detections (best first) at each IoU threshold.

    Returns matched [T, D], ignored [T, D] (on a crowd box, unmatched otherwise) and the
    IoU of each match [T, D]. As in COCO, a detection prefers an unmatched regular box;
    failing that, it is ignored when it overlaps a crowd box enough.
    """
    shape = (len(thresholds), len(boxes))
    matched, ignored, match_iou = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape)
    if len(gt_boxes) == 0:
        return matched, ignored, match_iou
    ious = _iou(boxes.astype(np.float64), gt_boxes.astype(np.float64), crowd)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(gt_boxes), bool)
        for i in range(len(boxes)):
            free = np.where(~taken & ~crowd, ious[i], -1.0)
            j = int(free.argmax())
            if free[j] >= threshold:
                taken[j], matched[t, i], match_iou[t, i] = True, True, ious[i, j]
            elif crowd.any() and ious[i][crowd].max() >= threshold:
                ignored[t, i] = True
    return matched, ignored, match_iou


def _prf(tp: int, fp: int, num_gt: int, iou_sum: float = 0.0) -> dict:
    tp, fp, num_gt = int(tp), int(fp), int(num_gt)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / num_gt if num_gt else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (
        0.0 if precision is not None and recall is not None else None)
    return {"precision": precision, "recall": recall, "f1": f1, "mean_iou": iou_sum / tp if tp else None,
            "tp": tp, "fp": fp, "fn": num_gt - tp}


def _iou(boxes: np.ndarray, gt_boxes: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """[D, G] IoU; against a crowd box, the share of the detection inside it (COCO's rule)."""
    lt = np.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_d = (boxes[:, 2:] - boxes[:, :2]).clip(0).prod(-1)[:, None]
    area_g = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clip(0).prod(-1)[None, :]
    union = np.where(crowd[None, :], area_d, area_d + area_g - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def format_operating_point(op: dict) -> str:
    """The operating point as text: overall, per class, and the IoU sweep."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"\nOperating point: score >= {op['score_threshold']}, IoU >= {op['iou_threshold']}",
             f"  precision {fmt(op['precision'])}  recall {fmt(op['recall'])}  F1 {fmt(op['f1'])}  "
             f"mean IoU {fmt(op['mean_iou'])}  (TP {op['tp']}, FP {op['fp']}, FN {op['fn']})"]
    if op["per_class"]:
        width = max(12, *(len(name) for name in op["per_class"]))
        lines += ["", f"  {'class':<{width}}  {'P':>7}  {'R':>7}  {'F1':>7}  {'IoU':>7}"]
        for name, row in op["per_class"].items():
            lines.append(f"  {name:<{width}}  {fmt(row['precision']):>7}  {fmt(row['recall']):>7}  "
                         f"{fmt(row['f1']):>7}  {fmt(row['mean_iou']):>7}")
    lines += ["", "  IoU sweep:  " + "  ".join(f"{row['iou']:.2f}" for row in op["iou_sweep"]),
              "  F1:         " + "  ".join(fmt(row["f1"])[:4] for row in op["iou_sweep"])]
    return "\n".join(lines)
