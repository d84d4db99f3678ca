"""Parity of an exported ONNX model with PyTorch, on real images.

Gate A compares the raw outputs elementwise, with ONNX Runtime's graph optimisations
off and on, at two batch sizes: scores pass when |ort - torch| <= atol + rtol * |torch|;
box coordinates when |ort - torch| <= atol + rtol * max(|torch|, S) for input size S.
A coordinate is a location minus a distance, so near 0 it is the small difference of
two large numbers: tolerance relative to its own value would be meaningless there. Gate B runs
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
    scales = {"boxes": float(images.shape[-1]), "scores": 0.0}
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
                name: _elementwise(g, r, rtol, atol, scales[name]) for name, g, r in zip(OUTPUT_NAMES, got, reference)
            }
            postnms = _compare_detections(got, reference, post_cfg)
            passed = all(o["pass"] for o in outputs.values()) and postnms["pass"]
            checks.append({"session": level_name, "batch": batch, "outputs": outputs, "postnms": postnms, "pass": passed})
    return {
        "verdict": "pass" if all(c["pass"] for c in checks) else "fail",
        "thresholds": {"rtol": rtol, "atol": atol, "boxes_relative_to": scales["boxes"],
                       "postnms_min_iou": POSTNMS_MIN_IOU,
                       "postnms_score_atol": POSTNMS_SCORE_ATOL},
        "num_images": len(images),
        "checks": checks,
    }


def _elementwise(got: np.ndarray, ref: np.ndarray, rtol: float, atol: float, scale: float) -> dict[str, Any]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    allowed = atol + rtol * np.maximum(np.abs(ref.astype(np.float64)), scale)
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
    """Gate B: the same postprocessing on both sides must give the same detections.

    Detections within POSTNMS_SCORE_ATOL of a cutoff (score threshold, the pre-NMS
    top-k or max_det) may legitimately swap places on a 1e-8 score difference, so
    only detections clearly above every cutoff must find a partner on the other side
    (same label, IoU >= POSTNMS_MIN_IOU, score within POSTNMS_SCORE_ATOL).
    """
    ours = postprocess_scores(torch.from_numpy(got[1]), torch.from_numpy(got[0]), post_cfg)
    theirs = postprocess_scores(torch.from_numpy(ref[1]), torch.from_numpy(ref[0]), post_cfg)
    unmatched, min_iou, max_score_diff, near_cutoff = 0, 1.0, 0.0, 0
    for a, b, scores_a, scores_b in zip(ours, theirs, got[1], ref[1]):
        stable_a = a.scores.numpy() > _cutoff(a, scores_a, post_cfg) + POSTNMS_SCORE_ATOL
        stable_b = b.scores.numpy() > _cutoff(b, scores_b, post_cfg) + POSTNMS_SCORE_ATOL
        near_cutoff += int((~stable_a).sum() + (~stable_b).sum())
        partner_iou, partner_diff = _partners(a, b)  # [Ka], [Ka] for a's detections; -1 = none
        partner_iou_b, partner_diff_b = _partners(b, a)
        for ious, diffs, stable in ((partner_iou, partner_diff, stable_a), (partner_iou_b, partner_diff_b, stable_b)):
            ious, diffs = ious[stable], diffs[stable]
            unmatched += int(((ious < POSTNMS_MIN_IOU) | (diffs > POSTNMS_SCORE_ATOL)).sum())
            if ious.size:
                min_iou, max_score_diff = min(min_iou, float(ious.min())), max(max_score_diff, float(diffs.max()))
    return {
        "detections": int(sum(len(d.scores) for d in theirs)),
        "unmatched": unmatched,
        "near_cutoff_not_required": near_cutoff,
        "min_matched_iou": min_iou,
        "max_score_diff": max_score_diff,
        "pass": unmatched == 0,
    }


def _cutoff(det: Detections, scores: np.ndarray, post_cfg: PostprocessConfig) -> float:
    """The score below which a detection could have been cut by a near-tie."""
    cutoff = post_cfg.score_threshold
    flat = scores.reshape(-1)
    if (flat > post_cfg.score_threshold).sum() > post_cfg.pre_nms_topk:
        cutoff = max(cutoff, float(np.partition(flat, -post_cfg.pre_nms_topk)[-post_cfg.pre_nms_topk]))
    if len(det.scores) >= post_cfg.max_det:
        cutoff = max(cutoff, float(det.scores.min()))
    return cutoff


def _partners(a: Detections, b: Detections) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one (Hungarian) match of a's detections to b's of the same label by IoU.

    Returns for each detection of `a` the IoU with its partner and the score gap
    (IoU -1 and gap inf when it has none).
    """
    ious = np.full(len(a.scores), -1.0)
    gaps = np.full(len(a.scores), np.inf)
    if len(a.scores) and len(b.scores):
        iou = box_iou(a.boxes, b.boxes)[0].numpy()
        iou[a.labels.numpy()[:, None] != b.labels.numpy()[None, :]] = -1.0
        rows, cols = linear_sum_assignment(-iou)
        matched = iou[rows, cols] >= 0
        ious[rows[matched]] = iou[rows[matched], cols[matched]]
        gaps[rows[matched]] = np.abs(a.scores.numpy()[rows[matched]] - b.scores.numpy()[cols[matched]])
    return ious, gaps
