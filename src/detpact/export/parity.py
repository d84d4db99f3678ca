"""Parity of an exported ONNX model with PyTorch, on real images.

Gate A compares the raw outputs elementwise, with ONNX Runtime's graph optimisations
off and on, at two batch sizes: scores pass when |ort - torch| <= atol + rtol * |torch|;
box coordinates when |ort - torch| <= atol + rtol * max(|torch|, S) for input size S.
A coordinate is a location minus a distance, so near 0 it is the small difference of
two large numbers: tolerance relative to its own value would be meaningless there. An
NMS-free model's queries are compared as a set: rows that swapped places through a score
tie are put back in order first (`align_queries`). Gate B runs
the same postprocessing on both and requires the same detections: each (location, class)
kept on one side is kept on the other, with boxes at IoU >= 0.99 and scores within 1e-3.

Outputs within tolerance can still flip a decision that sits on a knife edge, and such a
flip is a tie, not a difference: a detection near a score cut-off, a pair whose IoU is
within POSTNMS_IOU_TIE of the NMS threshold on both sides (1e-4 px of box noise moves a
small box's IoU by about 1e-5), two scores within POSTNMS_SCORE_ATOL swapping ranks, and
whatever such a flip suppresses or lets through in turn. Gate B excuses exactly those,
counts them, and names every other difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from scipy.optimize import linear_sum_assignment

from detpact.config import PostprocessConfig
from detpact.export.nms_graph import OUTPUTS as GRAPH_OUTPUTS
from detpact.export.nms_graph import RAW
from detpact.export.onnx import INPUT_NAME, OUTPUT_NAMES, DeployModel
from detpact.models.boxes import box_iou
from detpact.models.postprocess import Detections, postprocess_scores

POSTNMS_MIN_IOU = 0.99
POSTNMS_SCORE_ATOL = 1e-3
POSTNMS_IOU_TIE = 1e-3
MAX_EXAMPLES = 5
ORT_LEVELS = {
    "ort_disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ort_enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def check_parity(
    deploy: DeployModel, onnx_model: str | bytes, images: np.ndarray, post_cfg: PostprocessConfig, rtol: float,
    atol: float, in_graph: bool = False,
) -> dict[str, Any]:
    """Compare ONNX Runtime with eager PyTorch (fp32) on `images` [N, 3, S, S] float32 in [0, 1].

    `onnx_model`: a file path or the serialized model. With `in_graph`, the model carries its
    postprocessing (export/nms_graph.py) and also outputs raw_boxes / raw_scores: gates A
    and B run on those, and gate C requires the graph's detections to be exactly what
    models/postprocess.py makes of the same raw outputs.
    """
    nms = not deploy.detector.nms_free
    raw_names = [RAW[name] for name in OUTPUT_NAMES] if in_graph else list(OUTPUT_NAMES)
    fetch = raw_names + (list(GRAPH_OUTPUTS) if in_graph else [])
    with torch.no_grad():
        reference = [t.numpy() for t in deploy.eval()(torch.from_numpy(images))]
    scales = {"boxes": float(images.shape[-1]), "scores": 0.0}
    checks = []
    for level_name, level in ORT_LEVELS.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        for batch in sorted({1, len(images)}):
            fetched = [np.concatenate(parts) for parts in zip(*(
                session.run(fetch, {INPUT_NAME: images[i : i + batch]})
                for i in range(0, len(images), batch)
            ))]  # fmt: skip
            got, final = fetched[:2], fetched[2:]
            graph = compare_in_graph(final, got, post_cfg, nms) if in_graph else None
            reordered = 0
            if not nms:  # a set of queries: their order is not part of the output
                got, reordered = align_queries(got, reference, rtol, atol, [scales[name] for name in OUTPUT_NAMES])
            outputs = {
                name: _elementwise(g, r, rtol, atol, scales[name]) for name, g, r in zip(OUTPUT_NAMES, got, reference)
            }
            postnms = compare_detections(got, reference, post_cfg, nms)
            passed = all(o["pass"] for o in outputs.values()) and postnms["pass"] and (graph or {"pass": True})["pass"]
            checks.append({"session": level_name, "batch": batch, "outputs": outputs, "postnms": postnms,
                           **({"in_graph": graph} if graph else {}), "reordered_queries": reordered, "pass": passed})
    return {
        "verdict": "pass" if all(c["pass"] for c in checks) else "fail",
        "thresholds": {"rtol": rtol, "atol": atol, "boxes_relative_to": scales["boxes"],
                       "postnms_min_iou": POSTNMS_MIN_IOU,
                       "postnms_score_atol": POSTNMS_SCORE_ATOL, "postnms_iou_tie": POSTNMS_IOU_TIE},
        "num_images": len(images),
        "checks": checks,
    }


def compare_in_graph(final: list[np.ndarray], raw: list[np.ndarray], post_cfg: PostprocessConfig,
                     nms: bool) -> dict[str, Any]:
    """Gate C: the graph's detections (boxes, scores, labels, num_dets) against
    models/postprocess.py on the same raw outputs. Both sides see identical numbers, so
    every detection must be on both sides, but for float rounding in the boxes and for
    the order of equal scores: which of two tied candidates the top-k takes, or NMS
    visits first, is arbitrary, so a detection whose score another candidate of the image
    shares exactly may be on one side only (counted as `tie_order`)."""
    boxes, scores, labels, counts = final
    reference = postprocess_scores(torch.from_numpy(raw[1]), torch.from_numpy(raw[0]), post_cfg, nms)
    mismatched, tie_order, examples = 0, 0, []
    for image, (ref, n) in enumerate(zip(reference, counts.tolist())):
        ours = (boxes[image, :n], scores[image, :n], labels[image, :n])
        theirs = (ref.boxes.numpy(), ref.scores.numpy(), ref.labels.numpy())
        lonely = [*_unmatched(ours, theirs), *_unmatched(theirs, ours)]
        if not lonely:
            continue
        values, repeats = np.unique(raw[1][image], return_counts=True)
        tied = set(values[repeats > 1].tolist())
        if all(score in tied for score in lonely):
            tie_order += 1
            continue
        mismatched += 1
        _example(examples, f"image {image}: {len(lonely)} detections on one side only (the graph kept {n}, "
                           f"postprocess {len(ref.scores)}), scores {sorted(lonely, reverse=True)[:3]}")
    return {"images": len(reference), "mismatched_images": mismatched, "tie_order_images": tie_order,
            "examples": examples, "pass": mismatched == 0}


def _unmatched(side: tuple[np.ndarray, ...], other: tuple[np.ndarray, ...]) -> list[float]:
    """Scores of `side`'s detections that `other` lacks (same label and score, box within rounding)."""
    free = np.ones(len(other[1]), bool)
    lonely = []
    for box, score, label in zip(*side):
        match = free & (other[2] == label) & (other[1] == score) & np.isclose(other[0], box, rtol=1e-6, atol=1e-4).all(1)
        if match.any():
            free[int(match.argmax())] = False
        else:
            lonely.append(float(score))
    return lonely


def align_queries(got: list[np.ndarray], ref: list[np.ndarray], rtol: float, atol: float,
                  scales: list[float]) -> tuple[list[np.ndarray], int]:
    """`got` with each image's query rows put in `ref`'s order, and how many rows moved.

    An NMS-free model's queries are a set: the encoder ranks them by score, and two
    scores within rounding of each other may swap ranks between runtimes, which swaps
    their rows and nothing else (the decoder is permutation-equivariant). Rows that agree
    in place stay; the others are paired with the reference rows they are closest to
    (the worst element's diff over its tolerance, Hungarian), so a swap passes the
    elementwise gate and a row that differs still fails it.
    """
    aligned = [g.copy() for g in got]
    moved = 0
    for image in range(len(ref[0])):
        # violation[i, j]: how far got row i is from ref row j, in units of the tolerance
        violation = np.zeros((ref[0].shape[1], ref[0].shape[1]))
        for g, r, scale in zip(got, ref, scales):
            a, b = g[image].astype(np.float64), r[image].astype(np.float64)  # [Q, K]
            violation = np.maximum(violation, (np.abs(a[:, None] - b[None]) / _allowed(b, rtol, atol, scale)).max(-1))
        unsettled = np.nonzero(np.diag(violation) > 1.0)[0]
        if len(unsettled) == 0:
            continue
        rows, cols = linear_sum_assignment(violation[np.ix_(unsettled, unsettled)])
        order = np.arange(len(violation))
        order[unsettled[cols]] = unsettled[rows]  # ref row j takes got row order[j]
        moved += int((order != np.arange(len(order))).sum())
        for out, g in zip(aligned, got):
            out[image] = g[image][order]
    return aligned, moved


def _allowed(ref: np.ndarray, rtol: float, atol: float, scale: float) -> np.ndarray:
    """Gate A's tolerance of each value: atol + rtol * max(|ref|, scale) (see the module docstring)."""
    return atol + rtol * np.maximum(np.abs(ref.astype(np.float64)), scale)


def _elementwise(got: np.ndarray, ref: np.ndarray, rtol: float, atol: float, scale: float) -> dict[str, Any]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    over = diff > _allowed(ref, rtol, atol, scale)
    return {
        "shape": list(got.shape),
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float((diff / np.maximum(np.abs(ref), 1e-12)).max(initial=0.0)),
        "pct_over_tolerance": float(100.0 * over.mean()) if diff.size else 0.0,
        "pass": bool(not over.any() and np.isfinite(got).all()),
    }


@dataclass
class _Side:
    """One side's view of an image: its detections and the raw outputs they came from."""

    name: str
    dets: Detections
    boxes: np.ndarray  # [A, 4] raw boxes of every location
    scores: np.ndarray  # [A, C] raw scores
    cutoff: float  # below this score a detection may have been cut by a near-tie
    kept: dict[tuple[int, int], int]  # (location, label) -> its index in dets

    @classmethod
    def of(cls, name: str, dets: Detections, boxes: np.ndarray, scores: np.ndarray,
           post_cfg: PostprocessConfig, nms: bool) -> _Side:
        keys = zip(dets.locations.tolist(), dets.labels.tolist())
        return cls(name, dets, boxes, scores, _cutoff(dets, scores, post_cfg, nms), {k: i for i, k in enumerate(keys)})


def compare_detections(got: list[np.ndarray], ref: list[np.ndarray], post_cfg: PostprocessConfig,
                       nms: bool = True) -> dict[str, Any]:
    """Gate B on raw outputs (boxes [B, A, 4], scores [B, A, C]) of onnxruntime (`got`) and
    torch (`ref`): the same postprocessing (with NMS or, for an NMS-free model, without)
    must keep the same detections, but for ties."""
    ours = postprocess_scores(torch.from_numpy(got[1]), torch.from_numpy(got[0]), post_cfg, nms)
    theirs = postprocess_scores(torch.from_numpy(ref[1]), torch.from_numpy(ref[0]), post_cfg, nms)
    tally = {"changed": 0, "unexplained": 0, "score_cutoff": 0, "nms_tie": 0}
    examples: list[str] = []
    min_iou, max_score_diff = 1.0, 0.0
    for image, (a, b) in enumerate(zip(ours, theirs)):
        ort_side = _Side.of("onnxruntime", a, got[0][image], got[1][image], post_cfg, nms)
        torch_side = _Side.of("torch", b, ref[0][image], ref[1][image], post_cfg, nms)
        for key in ort_side.kept.keys() & torch_side.kept.keys():
            i, j = ort_side.kept[key], torch_side.kept[key]
            iou = float(box_iou(a.boxes[i : i + 1], b.boxes[j : j + 1])[0])
            diff = abs(float(a.scores[i]) - float(b.scores[j]))
            min_iou, max_score_diff = min(min_iou, iou), max(max_score_diff, diff)
            if iou < POSTNMS_MIN_IOU or diff > POSTNMS_SCORE_ATOL:
                tally["changed"] += 1
                _example(examples, f"image {image}: location {key[0]} class {key[1]} differs (box IoU {iou:.4f}, "
                                   f"score {float(a.scores[i]):.5f} vs {float(b.scores[j]):.5f})")
        for reason, text in _judge_flips(image, ort_side, torch_side, post_cfg.iou_threshold if nms else None):
            tally[reason] += 1
            if text:
                _example(examples, text)
    unmatched = tally["changed"] + tally["unexplained"]
    return {
        "detections": int(sum(len(d.scores) for d in theirs)),
        "unmatched": unmatched,
        "changed": tally["changed"],
        "kept_on_one_side_only": tally["unexplained"],
        "near_cutoff_not_required": tally["score_cutoff"],
        "nms_ties_not_required": tally["nms_tie"],
        "min_matched_iou": min_iou,
        "max_score_diff": max_score_diff,
        "examples": examples,
        "pass": unmatched == 0,
    }


def _judge_flips(image: int, ort_side: _Side, torch_side: _Side, iou_threshold: float | None
                 ) -> list[tuple[str, str]]:
    """(reason, example text) for every detection kept on one side only, best score first
    (`iou_threshold` None: no NMS ran, so only a score cut-off can excuse a flip).

    A flip is excused when the detection sits at a score cut-off (within POSTNMS_SCORE_ATOL
    above it on the side that kept it, below it on the other), or when
    NMS suppressed it on the other side through a tie: a suppressor whose IoU with it is
    within POSTNMS_IOU_TIE of the threshold on both sides, whose score is within
    POSTNMS_SCORE_ATOL of it, or which is itself an excused flip (a tie's knock-on effect).
    """
    flips = [(side, other, key) for side, other in ((ort_side, torch_side), (torch_side, ort_side))
             for key in side.kept.keys() - other.kept.keys()]
    flips.sort(key=lambda f: -float(f[0].dets.scores[f[0].kept[f[2]]]))
    excused: set[tuple[int, int]] = set()
    verdicts = []
    for side, other, key in flips:
        location, label = key
        # Near the cut-off: barely above it where kept, barely below it where dropped (a
        # detection dropped far below the cut-off is a changed score, not a tie).
        near_cutoff = (float(side.scores[location, label]) <= side.cutoff + POSTNMS_SCORE_ATOL
                       and float(other.scores[location, label]) >= other.cutoff - POSTNMS_SCORE_ATOL)
        if near_cutoff:
            excused.add(key)
            verdicts.append(("score_cutoff", ""))
        elif iou_threshold is not None and _suppressed_by_tie(key, other, side, iou_threshold, excused):
            excused.add(key)
            verdicts.append(("nms_tie", ""))
        else:
            verdicts.append(("unexplained", f"image {image}: location {location} class {label} (score "
                             f"{float(side.scores[location, label]):.5f}) kept by {side.name} only, with no "
                             f"near-tie to explain it"))
    return verdicts


def _suppressed_by_tie(key: tuple[int, int], suppressing: _Side, keeping: _Side, iou_threshold: float,
                       excused: set[tuple[int, int]]) -> bool:
    """Whether some detection that suppressed `key` on `suppressing` did so through a tie."""
    location, label = key
    box = torch.from_numpy(suppressing.boxes[location : location + 1])
    score = float(suppressing.scores[location, label])
    for (c_location, c_label), index in suppressing.kept.items():
        if c_label != label or float(suppressing.dets.scores[index]) < score:
            continue
        iou_here = float(box_iou(torch.from_numpy(suppressing.boxes[c_location : c_location + 1]), box)[0])
        if iou_here <= iou_threshold:
            continue  # not a suppressor
        iou_there = float(box_iou(torch.from_numpy(keeping.boxes[c_location : c_location + 1]),
                                  torch.from_numpy(keeping.boxes[location : location + 1]))[0])
        iou_tie = abs(iou_here - iou_threshold) <= POSTNMS_IOU_TIE and abs(iou_there - iou_threshold) <= POSTNMS_IOU_TIE
        rank_tie = abs(float(keeping.scores[c_location, label]) - float(keeping.scores[location, label])) \
            <= POSTNMS_SCORE_ATOL
        if iou_tie or rank_tie or (c_location, c_label) in excused:
            return True
    return False


def _example(examples: list[str], text: str) -> None:
    if len(examples) < MAX_EXAMPLES:
        examples.append(text)


def _cutoff(det: Detections, scores: np.ndarray, post_cfg: PostprocessConfig, nms: bool) -> float:
    """The score below which a detection could have been cut by a near-tie."""
    cutoff = post_cfg.score_threshold
    flat = scores.reshape(-1)
    if nms and (flat > post_cfg.score_threshold).sum() > post_cfg.pre_nms_topk:
        cutoff = max(cutoff, float(np.partition(flat, -post_cfg.pre_nms_topk)[-post_cfg.pre_nms_topk]))
    if len(det.scores) >= post_cfg.max_det:
        cutoff = max(cutoff, float(det.scores.min()))
    return cutoff


def describe_failure(report: dict[str, Any]) -> str:
    """What differed in a failed parity report, in a sentence or two, with the likely fix."""
    over: dict[str, tuple[float, float]] = {}
    for check in report["checks"]:
        for name, out in check["outputs"].items():
            if not out["pass"]:
                worst = over.get(name, (0.0, 0.0))
                over[name] = (max(worst[0], out["max_abs"]), max(worst[1], out["pct_over_tolerance"]))
    postnms = [c["postnms"] for c in report["checks"] if not c["postnms"]["pass"]]
    parts = []
    if over:
        listing = ", ".join(f"{name} (max |diff| {m:.3g}, {pct:.3g} % of values)" for name, (m, pct) in over.items())
        parts.append(f"raw outputs over tolerance: {listing}. Try another export.opset (or, for "
                     "the dense head, export.exporter), or inspect the model")
    else:
        parts.append("every raw output is within tolerance")
    if postnms:
        worst = max(postnms, key=lambda p: p["unmatched"])
        parts.append(f"after NMS {worst['unmatched']} of {worst['detections']} detections differ with no near-tie "
                     f"to explain them ({'; '.join(worst['examples'][:2])})")
    graph = [c["in_graph"] for c in report["checks"] if not c.get("in_graph", {"pass": True})["pass"]]
    if graph:
        parts.append(f"the in-graph postprocessing differs from detpact's on {graph[0]['mismatched_images']} images "
                     f"({'; '.join(graph[0]['examples'][:2])})")
    accuracy = report.get("map")
    if accuracy and not accuracy["pass"]:
        parts.append(f"mAP .50:.95 on {accuracy['images']} validation images: ONNX {accuracy['onnx']:.5f} vs PyTorch "
                     f"{accuracy['torch']:.5f}, a difference of {accuracy['diff']:.5f} > {accuracy['tolerance']}")
    return "; ".join(parts)
