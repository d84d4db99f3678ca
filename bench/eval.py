"""COCO evaluation speed: detpact from in-memory detections vs the JSON-file paths.

A seeded, COCO-like set (5,000 images, 80 classes by default): ground truth with 0 to
~20 boxes per image (some images empty, about 1 % crowd regions, areas from a few
pixels to most of the image) and detections made of noisy copies of the GT plus false
positives, 20 to 100 per image, with scores rounded to 3 decimals so many tie.

Three evaluations of the same detections, timed from their natural input to the 12
COCO stats:

- pycocotools: `COCO(gt.json)`, `loadRes(results.json)`, `COCOeval` evaluate /
  accumulate / summarize;
- faster-coco-eval on the same two JSON files, with `COCOeval_faster`;
- detpact: `evaluate_detections(gts, dets, class_names)` on the arrays in memory.

The JSON files are written once before timing (not timed), with the results in
detpact's documented rank order so that tied scores are ranked alike. The variants
alternate in one process after a warm-up on a small subset, each after a
`gc.collect()`; each figure is the median of `--repeats`. All 12 stats must agree:
pycocotools vs detpact within 1e-12. detpact pauses Python's garbage collector while it
evaluates; `--gc-paused-reference` also times faster-coco-eval's JSON path that way, to
show how much of the gap that pause makes.

    .venv/bin/python bench/eval.py [--images 5000] [--repeats 3] [--gc-paused-reference]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from detpact.evaluation.coco import HEADLINE_KEYS, ImageDetections, ImageGT, evaluate_detections

NUM_CLASSES = 80
TOL = 1e-12


def make_dataset(num_images: int, seed: int = 0) -> tuple[list[ImageGT], list[ImageDetections]]:
    """Seeded COCO-like ground truth and detections (xyxy pixels, float64 GT, float32 detections)."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        n = 0 if rng.uniform() < 0.05 else int(min(rng.geometric(1 / 7), 25))
        boxes = _random_boxes(rng, n, width, height)  # [n, 4] xyxy
        labels = rng.integers(0, NUM_CLASSES, n)
        crowd = rng.uniform(size=n) < 0.01
        gts.append(ImageGT(image_id, width, height, boxes, labels, crowd))

        # Detections: 0-3 jittered copies of each GT (a few relabelled), then false
        # positives up to a per-image total drawn from 20..100.
        copies = rng.integers(0, 4, n)
        src = np.repeat(np.arange(n), copies)
        sizes = np.repeat(boxes[:, 2:] - boxes[:, :2], copies, axis=0)  # [m, 2]
        near = boxes[src] + rng.normal(0, 0.08, (len(src), 4)) * np.tile(sizes, 2)
        near_labels = np.where(rng.uniform(size=len(src)) < 0.1, rng.integers(0, NUM_CLASSES, len(src)), labels[src])
        near_scores = rng.beta(5, 2, len(src))
        total = max(int(rng.integers(20, 101)), len(src))
        fp = _random_boxes(rng, total - len(src), width, height)
        det_boxes = np.concatenate([near, fp])
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 0.5)  # keep x2 > x1
        det_labels = np.concatenate([near_labels, rng.integers(0, NUM_CLASSES, len(fp))])
        det_scores = np.round(np.concatenate([near_scores, rng.beta(1.2, 5, len(fp))]), 3)
        order = rng.permutation(len(det_boxes))  # models emit boxes in no particular order
        dets.append(ImageDetections(image_id, det_boxes[order].astype(np.float32),
                                    det_scores[order].astype(np.float32), det_labels[order]))  # fmt: skip
    return gts, dets


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """[n, 4] xyxy boxes with log-uniform sides (2 px to most of the image), rounded to 0.01 px."""
    wh = np.exp(rng.uniform(np.log(2.0), np.log([0.9 * width, 0.9 * height]), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - wh)
    return np.round(np.concatenate([xy, xy + wh], axis=1), 2)


def write_json(gts: list[ImageGT], dets: list[ImageDetections], root: Path) -> tuple[Path, Path]:
    """gt.json and results.json, built here (not by detpact) from the same float64 numbers.

    Results are listed in detpact's rank order (-score, image_id, label, x1, y1, x2, y2):
    with tied scores COCO ranks by input order, so both sides must see the same order.
    """
    images, annotations = [], []
    for g in gts:
        images.append({"id": g.image_id, "width": g.width, "height": g.height})
        for (x1, y1, x2, y2), label, crowd in zip(g.boxes.tolist(), g.labels.tolist(), g.iscrowd.tolist(), strict=True):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": g.image_id, "category_id": label + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd)})  # fmt: skip
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    rows = sorted(
        (-s, d.image_id, label, *box)
        for d in dets
        for box, s, label in zip(
            d.boxes.astype(np.float64).tolist(), d.scores.astype(np.float64).tolist(), d.labels.tolist(), strict=True
        )
    )
    results = [{"image_id": img, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": -neg}
               for neg, img, label, x1, y1, x2, y2 in rows]  # fmt: skip
    gt_path, res_path = root / "gt.json", root / "results.json"
    gt_path.write_text(json.dumps({"images": images, "categories": categories, "annotations": annotations}))
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


def run_pycocotools(gt_path: Path, res_path: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(res_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats[:12]]


def run_faster_coco_eval(gt_path: Path, res_path: Path) -> list[float]:
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*args: object, **kwargs: object) -> None:
        pass

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path), print_function=quiet)
        evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(str(res_path)), iouType="bbox", print_function=quiet)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats[:12]]


def run_detpact(gts: list[ImageGT], dets: list[ImageDetections]) -> list[float]:
    metrics = evaluate_detections(gts, dets, [f"class{c}" for c in range(NUM_CLASSES)], max_det=100)
    return [-1.0 if metrics[k] is None else metrics[k] for k in HEADLINE_KEYS]  # COCO's -1 for "undefined"


def timed(fn: Callable[[], list[float]]) -> tuple[float, list[float]]:
    gc.collect()  # no variant pays for the garbage of the one before
    started = time.perf_counter()
    stats = fn()
    return time.perf_counter() - started, stats


def gc_paused(fn: Callable[[], list[float]]) -> Callable[[], list[float]]:
    """`fn` with the cyclic garbage collector off, as detpact runs its evaluation."""

    def run() -> list[float]:
        gc.disable()
        try:
            return fn()
        finally:
            gc.enable()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gc-paused-reference", action="store_true",
                        help="also time faster-coco-eval's JSON path with the garbage collector paused")  # fmt: skip
    args = parser.parse_args()

    gts, dets = make_dataset(args.images, args.seed)
    num_gt = sum(len(g.boxes) for g in gts)
    num_dets = sum(len(d.boxes) for d in dets)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"{args.images} images, {NUM_CLASSES} classes, {num_gt} GT boxes "
          f"({sum(int(g.iscrowd.sum()) for g in gts)} crowd, {sum(len(g.boxes) == 0 for g in gts)} empty images), "
          f"{num_dets} detections ({num_dets / args.images:.1f} per image)")  # fmt: skip

    with tempfile.TemporaryDirectory() as root:
        warm = min(200, args.images)
        small = Path(root) / "warm"
        small.mkdir()
        small_paths = write_json(gts[:warm], dets[:warm], small)
        run_pycocotools(*small_paths)
        run_faster_coco_eval(*small_paths)
        run_detpact(gts[:warm], dets[:warm])

        paths = write_json(gts, dets, Path(root))
        variants = {
            "pycocotools (JSON)": lambda: run_pycocotools(*paths),
            "faster-coco-eval (JSON)": lambda: run_faster_coco_eval(*paths),
            "detpact (in memory)": lambda: run_detpact(gts, dets),
        }
        if args.gc_paused_reference:
            variants["faster-coco-eval (JSON, GC paused)"] = gc_paused(variants["faster-coco-eval (JSON)"])
        times: dict[str, list[float]] = {name: [] for name in variants}
        stats: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            for name, fn in variants.items():
                seconds, stats[name] = timed(fn)
                times[name].append(seconds)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in variants))

    ref, fce, ours = (np.array(stats[name]) for name in list(variants)[:3])
    diff_py, diff_fce = float(np.abs(ours - ref).max()), float(np.abs(ours - fce).max())
    print("stats (pycocotools): " + ", ".join(f"{k}={v:.4f}" for k, v in zip(HEADLINE_KEYS, ref, strict=True)))
    print(f"max |detpact - pycocotools| over the 12 stats: {diff_py:.3g}; "
          f"max |detpact - faster-coco-eval|: {diff_fce:.3g}")  # fmt: skip
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: median {medians[name]:.2f} s (min {min(t):.2f}, max {max(t):.2f}, {args.repeats} repeats)")
    ratios = [o / f for o, f in zip(times["detpact (in memory)"], times["faster-coco-eval (JSON)"], strict=True)]
    print(f"detpact / faster-coco-eval JSON: {medians['detpact (in memory)'] / medians['faster-coco-eval (JSON)']:.3f} "
          f"(per repeat {', '.join(f'{r:.3f}' for r in ratios)}); target <= 0.75")  # fmt: skip
    if args.gc_paused_reference:
        paused = medians["faster-coco-eval (JSON, GC paused)"]
        print(f"detpact / faster-coco-eval JSON with the GC paused too: {medians['detpact (in memory)'] / paused:.3f}")
    if diff_py > TOL or diff_fce > TOL:
        raise SystemExit(f"stats differ by more than {TOL}")


if __name__ == "__main__":
    main()
