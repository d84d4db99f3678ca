"""COCO box mAP, computed by faster-coco-eval with pycocotools semantics.

The matching and accumulation are faster-coco-eval's (a C++ port of pycocotools'
`COCOeval`); this module hands it our records as COCO dicts (evaluation/records.py
converts them: detections straight to the annotations `loadRes` would make of them),
guards the inputs pycocotools mishandles, and turns the evaluator's arrays into a
plain dict.

Semantics worth knowing (pycocotools', kept on purpose; tests pin them):

- `max_det` caps detections per image *per category*, not per image. We pass
  `maxDets=[1, 10, max_det]`, so AP and the area metrics are read at `max_det`.
- The small/medium/large split uses each GT's `area` field (the mask area in real
  COCO files). `to_coco_gt` writes the box area, w * h.
- Crowd GTs (`iscrowd=1`) are ignore regions: detections on them count as neither
  TP nor FP, and they are not counted in `num_gt`.
- A class with no (non-crowd) GT has no AP: COCO leaves it out of the mean, so false
  positives on it are invisible. We report it as `None` and count its detections in
  `no_gt_class_dets`.
- Detections with equal scores are ranked in input order (a stable sort). So
  `evaluate_coco_json` keeps the caller's order, exactly as pycocotools does, and
  `to_coco_results` first sorts by content so the result does not depend on the
  order a model happened to emit its boxes in.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
from collections import Counter
from collections.abc import Iterator, Mapping

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from detpact.errors import DetpactError
from detpact.evaluation.records import ImageDetections as ImageDetections  # the records evaluated here
from detpact.evaluation.records import ImageGT as ImageGT
from detpact.evaluation.records import (
    check_unique,
    detection_annotations,
    ranked_detections,
    result_annotations,
)
from detpact.evaluation.records import to_coco_gt as to_coco_gt
from detpact.evaluation.records import to_coco_results as to_coco_results

logger = logging.getLogger(__name__)

# Names for COCOeval.stats[0:12], in its order. With exactly three maxDets and the
# default area ranges this layout is the same in faster-coco-eval 1.6 to 1.8.
HEADLINE_KEYS = (
    "map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
    "ar1", "ar10", "ar_max", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (as it was before, after it).

    An evaluation allocates a few containers per box (the COCO dicts and bbox lists,
    the evaluator's per-image-and-class lists), hundreds of thousands on a COCO-sized
    set, and keeps them all until it returns. Each allocation burst triggers
    collections that re-scan the growing heap and find nothing to free; that cost
    measured about a third of the whole evaluation (docs/benchmarks.md). Anything
    cyclic left behind is collected after the block, as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_gc_paused()
def evaluate_detections(
    gts: list[ImageGT], dets: list[ImageDetections], class_names: list[str], max_det: int = 100,
    curves: bool = False,
) -> dict:
    """COCO box metrics of `dets` against `gts`; see `evaluate_coco_json` for the keys.
    `curves`: also `pr_curves`, each class's precision-recall curve (see `_pr_curves`).

    Class id c becomes COCO category id c + 1, named `class_names[c]`. Detections are
    ranked by (-score, image_id, label, x1, y1, x2, y2) before evaluation, so the
    result depends only on the set of detections, not their order.
    """
    max_det = _checked_max_det(max_det)
    gt = to_coco_gt(gts, class_names)  # fresh dicts: the evaluator may mutate them
    ranked = ranked_detections(dets, num_classes=len(class_names))
    image_ids, labels = ranked[0], ranked[1]
    _check_result_ids(set(np.unique(image_ids).tolist()), set(), gt)
    dets_per_cat = dict(enumerate(np.bincount(labels, minlength=len(class_names)).tolist(), start=1))
    return _evaluate(gt, detection_annotations(*ranked), max_det, dets_per_cat, curves)


@_gc_paused()
def evaluate_coco_json(gt: dict, results: list[dict], max_det: int = 100) -> dict:
    """COCO box metrics of a results list against a COCO-format GT dict.

    `gt` needs `images` (with `id`), `categories` (with `id`, `name`) and
    `annotations` (with `image_id`, `category_id`, `bbox` xywh, `area`, optional
    `iscrowd`). Each result is `{image_id, category_id, bbox: [x, y, w, h], score}`.
    Neither input is modified. Ties in score are ranked in the order of `results`.

    Returns a JSON-serialisable dict:

    - `map50_95`, `map50`, `map75`: AP at IoU .50:.95 / .50 / .75, area all, at `max_det`
    - `map_small`, `map_medium`, `map_large`: AP .50:.95 per GT-area range, at `max_det`
    - `ar1`, `ar10`, `ar_max`: AR .50:.95 with 1 / 10 / `max_det` detections
      per image per class
    - `ar_small`, `ar_medium`, `ar_large`: AR .50:.95 per area range, at `max_det`
    - `per_class`, `per_class_ap50`: class name -> AP .50:.95 / AP .50 (area all,
      at `max_det`)
    - `no_gt_class_dets`: class name -> number of detections, for every class without
      GT (COCO cannot score these; all of them are false positives)
    - `num_images`, `num_gt` (non-crowd GT boxes), `num_dets` (len(results)), `max_det`

    Every metric is a float, or `None` where COCO reports -1 ("undefined"): a class or
    area range with no non-crowd GT, or every metric when there is no GT at all.
    No detections gives 0.0 for every defined metric (and a logged warning).
    Raises `DetpactError` for results on unknown image or category ids and for
    `max_det` < 10.
    """
    max_det = _checked_max_det(max_det)
    gt = _checked_gt_copy(gt)
    annotations = result_annotations(results)
    try:
        image_ids, cat_ids = {a["image_id"] for a in annotations}, {a["category_id"] for a in annotations}
    except TypeError as e:
        raise DetpactError(f"COCO result image_id and category_id must be integers ({e!r})") from None
    _check_result_ids(image_ids, cat_ids, gt)
    return _evaluate(gt, annotations, max_det, Counter(a["category_id"] for a in annotations))


def format_table(metrics: dict) -> str:
    """Readable text table of the headline metrics and per-class AP ('-': undefined)."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    max_det = metrics.get("max_det", 100)
    labels = {
        "map50_95": "AP @[.50:.95]", "map50": "AP @.50", "map75": "AP @.75",
        "map_small": "AP small", "map_medium": "AP medium", "map_large": "AP large",
        "ar1": "AR maxDets=1", "ar10": "AR maxDets=10", "ar_max": f"AR maxDets={max_det}",
        "ar_small": "AR small", "ar_medium": "AR medium", "ar_large": "AR large",
    }  # fmt: skip
    lines = [f"COCO bbox: {metrics['num_images']} images, {metrics['num_gt']} GT boxes, "
             f"{metrics['num_dets']} detections (max {max_det} per image per class)"]  # fmt: skip
    lines += [f"  {labels[k]:<16} {fmt(metrics[k])}" for k in HEADLINE_KEYS]
    per_class, ap50 = metrics["per_class"], metrics["per_class_ap50"]
    if per_class:
        width = max(12, *(len(name) for name in per_class))
        lines += ["", f"  {'class':<{width}}  {'AP':>7}  {'AP50':>7}"]
        for name, ap in per_class.items():
            note = "  (no GT)" if ap is None else ""
            lines.append(f"  {name:<{width}}  {fmt(ap):>7}  {fmt(ap50[name]):>7}{note}")
    unscored = {name: n for name, n in metrics.get("no_gt_class_dets", {}).items() if n}
    if unscored:
        lines.append("")
        lines.append("  detections on classes without GT (false positives COCO does not score): "
                     + ", ".join(f"{name}={n}" for name, n in unscored.items()))  # fmt: skip
    return "\n".join(lines)


def _evaluate(gt: dict, annotations: list[dict], max_det: int, dets_per_cat: Mapping[int, int],
              curves: bool = False) -> dict:
    """The metrics dict of `evaluate_coco_json`, from inputs the evaluator may mutate.

    `annotations` are the detections as COCO annotations (`detection_annotations`).
    """
    if not annotations:
        logger.warning("no detections to evaluate: every COCO metric with GT is 0.0")
    num_gt = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    if num_gt == 0:
        logger.warning("the ground truth has no (non-crowd) boxes: COCO metrics are undefined (None)")

    evaluator = _run_cocoeval(gt, annotations, max_det)

    metrics: dict = {key: _defined(s) for key, s in zip(HEADLINE_KEYS, evaluator.stats[:12], strict=True)}
    metrics.update(_per_class(evaluator, gt, dets_per_cat))
    metrics.update(num_images=len(gt["images"]), num_gt=num_gt, num_dets=len(annotations), max_det=max_det)
    if curves:
        metrics["pr_curves"] = _pr_curves(evaluator, gt)
    return metrics


def _run_cocoeval(gt: dict, annotations: list[dict], max_det: int) -> COCOeval_faster:
    """evaluate / accumulate / summarize with the evaluator's own printing silenced."""

    def quiet(*args: object, **kwargs: object) -> None:
        pass

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt, print_function=quiet)
        # The detections' COCO object built directly, as `loadRes` would build it from
        # a results list (area = w * h, ids from 1, iscrowd 0) but without its copy of
        # every result and the polygon it adds to each one, which bbox IoU never reads.
        # (pycocotools' and faster-coco-eval 1.6's loadRes also crash on [].)
        coco_dt = COCO(print_function=quiet)
        coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": annotations}
        coco_dt.createIndex()
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=quiet)
        # pycocotools' summarize reads AP at a hard-coded maxDets=100 (-1 otherwise);
        # faster-coco-eval reads it at maxDets[-1], which is max_det (it sorts the list).
        evaluator.params.maxDets = [1, 10, max_det]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _per_class(evaluator: COCOeval_faster, gt: dict, dets_per_cat: Mapping[int, int]) -> dict:
    """per_class / per_class_ap50 from the precision array, and no_gt_class_dets."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]: IoU, recall, class, area, maxDets
    ap, ap50 = {}, {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]  # [T, R] at area=all, maxDets=max_det
        ap[names[cat_id]] = _mean_defined(p)
        ap50[names[cat_id]] = _mean_defined(p[0])  # iouThrs[0] == 0.50
    no_gt = {names[c]: dets_per_cat.get(c, 0) for c in evaluator.params.catIds if ap[names[c]] is None}
    return {"per_class": ap, "per_class_ap50": ap50, "no_gt_class_dets": no_gt}


def _pr_curves(evaluator: COCOeval_faster, gt: dict) -> dict:
    """Each class's precision at COCO's 101 recall points, at IoU .50 (area all, max_det):
    the interpolated curve whose mean is the class's AP50. A class without GT has None."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        curve = precision[0, :, k, 0, -1]  # [R]; -1 everywhere when the class has no GT
        per_class[names[cat_id]] = None if (curve < 0).all() else [max(float(p), 0.0) for p in curve]
    return {"iou": 0.5, "recall": [float(r) for r in evaluator.params.recThrs], "precision": per_class}


def _checked_max_det(max_det: int) -> int:
    if not isinstance(max_det, (int, np.integer)) or max_det < 10:
        # COCO's summary reports AR@1, AR@10 and AR@max_det; below 10 those collide.
        # A detector that keeps fewer boxes per image loses nothing at max_det=10:
        # the cap is per image per class.
        raise DetpactError(f"max_det must be an integer >= 10 for COCO evaluation, got {max_det!r}")
    return int(max_det)


def _checked_gt_copy(gt: dict) -> dict:
    """A copy the evaluator may mutate, with ann ids renumbered from 1 (id 0 means unmatched)."""
    if not isinstance(gt.get("images"), list) or not isinstance(gt.get("categories"), list):
        raise DetpactError("COCO ground truth needs 'images' and 'categories' lists")
    images = [dict(img) for img in gt["images"]]
    categories = [dict(c) for c in gt["categories"]]
    check_unique([img["id"] for img in images], "ground-truth image ids")
    check_unique([c["id"] for c in categories], "category ids")
    check_unique([c["name"] for c in categories], "category names")
    annotations = [dict(a, id=i + 1) for i, a in enumerate(gt.get("annotations", []))]
    return {"images": images, "categories": categories, "annotations": annotations}


def _check_result_ids(image_ids: set, cat_ids: set, gt: dict) -> None:
    # pycocotools asserts "Results do not correspond to current coco set" on unknown
    # images and silently drops unknown categories (often an off-by-one class id).
    bad_images = sorted(image_ids - {img["id"] for img in gt["images"]})
    known_cats = {c["id"] for c in gt["categories"]}
    bad_cats = sorted(cat_ids - known_cats)
    if bad_images:
        raise DetpactError(
            f"detections reference image_id(s) not in the ground truth: {bad_images[:10]}"
            f"{' ...' if len(bad_images) > 10 else ''}; evaluate on the images the GT covers"
        )
    if bad_cats:
        raise DetpactError(
            f"detections use category_id(s) the ground truth does not define: {bad_cats[:10]} "
            f"(defined: {sorted(known_cats)[:10]}...); COCO category ids are class id + 1"
        )


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)  # COCO writes -1 for "undefined"


def _mean_defined(precision: np.ndarray) -> float | None:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None
