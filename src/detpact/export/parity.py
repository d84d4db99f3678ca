"""Parity of an exported ONNX model with PyTorch, on real images.

Gate A compares the raw outputs elementwise (|ort - torch| <= atol + rtol * |torch|)
with ONNX Runtime's graph optimisations off and on, at two batch sizes. Gate B runs
the same postprocessing on both and requires the same detections: equal counts and
labels, matched boxes with IoU >= 0.99 and scores within 1e-3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from scipy.optimize import linear_sum_assignment

from detpact.config import PostprocessConfig
from detpact.export.onnx import INPUT_NAME, OUTPUT_NAMES, DeployModel
from detpact.models.boxes import box_iou
from detpact.models.postprocess import Detections, postprocess_scores

POSTNMS_MIN_IOU = 0.99
POSTNMS_SCORE_ATOL = 1e-3
ORT_LEVELS = {
    "ort_disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ort_enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def check_parity(
    deploy: DeployModel, onnx_path: str, images: np.ndarray, post_cfg: PostprocessConfig, rtol: float, atol: float
) -> dict[str, Any]:
    """Compare ONNX Runtime with eager PyTorch (fp32) on `images` [N, 3, S, S] float32 in [0, 1]."""
    with torch.no_grad():
        reference = [t.numpy() for t in deploy.eval()(torch.from_numpy(images))]
    checks = []
    for level_name, level in ORT_LEVELS.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        for batch in sorted({1, len(images)}):
            got = [np.concatenate(parts) for parts in zip(*(
                session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i : i + batch]})
                for i in range(0, len(images), batch)
            ))]  # fmt: skip
            outputs = {
                name: _elementwise(g, r, rtol, atol) for name, g, r in zip(OUTPUT_NAMES, got, reference)
            }
            postnms = _compare_detections(got, reference, post_cfg)
            passed = all(o["pass"] for o in outputs.values()) and postnms["pass"]
            checks.append({"session": level_name, "batch": batch, "outputs": outputs, "postnms": postnms, "pass": passed})
    return {
        "verdict": "pass" if all(c["pass"] for c in checks) else "fail",
        "thresholds": {"rtol": rtol, "atol": atol, "postnms_min_iou": POSTNMS_MIN_IOU,
                       "postnms_score_atol": POSTNMS_SCORE_ATOL},
        "num_images": len(images),
        "checks": checks,
    }


def _elementwise(got: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> dict[str, Any]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    allowed = atol + rtol * np.abs(ref.astype(np.float64))
    over = diff > allowed
    return {
        "shape": list(got.shape),
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float((diff / np.maximum(np.abs(ref), 1e-12)).max(initial=0.0)),
        "pct_over_tolerance": float(100.0 * over.mean()) if diff.size else 0.0,
        "pass": bool(not over.any() and np.isfinite(got).all()),
    }


def _compare_detections(got: list[np.ndarray], ref: list[np.ndarray], post_cfg: PostprocessConfig) -> dict[str, Any]:
    ours = postprocess_scores(torch.from_numpy(got[1]), torch.from_numpy(got[0]), post_cfg)
    theirs = postprocess_scores(torch.from_numpy(ref[1]), torch.from_numpy(ref[0]), post_cfg)
    count_mismatch, min_iou, max_score_diff, label_mismatch = 0, 1.0, 0.0, 0
    for a, b in zip(ours, theirs):
        if len(a.scores) != len(b.scores):
            count_mismatch += 1
            continue
        iou, score_diff, labels_differ = _match(a, b)
        min_iou, max_score_diff = min(min_iou, iou), max(max_score_diff, score_diff)
        label_mismatch += labels_differ
    passed = count_mismatch == 0 and label_mismatch == 0 and min_iou >= POSTNMS_MIN_IOU \
        and max_score_diff <= POSTNMS_SCORE_ATOL
    return {
        "detections": int(sum(len(d.scores) for d in theirs)),
        "images_with_count_mismatch": count_mismatch,
        "label_mismatches": label_mismatch,
        "min_matched_iou": min_iou,
        "max_score_diff": max_score_diff,
        "pass": bool(passed),
    }


def _match(a: Detections, b: Detections) -> tuple[float, float, int]:
    """Hungarian-match two detection sets of equal size by IoU; worst IoU, worst score gap, label mismatches."""
    if len(a.scores) == 0:
        return 1.0, 0.0, 0
    iou = box_iou(a.boxes, b.boxes)[0].numpy()
    rows, cols = linear_sum_assignment(-iou)
    score_diff = np.abs(a.scores.numpy()[rows] - b.scores.numpy()[cols]).max()
    labels_differ = int((a.labels.numpy()[rows] != b.labels.numpy()[cols]).sum())
    return float(iou[rows, cols].min()), float(score_diff), labels_differ
