"""COCO box mAP: our faster-coco-eval wrapper == pycocotools, plus the edge cases.

pycocotools runs live here on small hand-made cases (RELIABILITY.md §6, matrix rows
37-38); the val2014_100 fixture is checked against stored pycocotools numbers.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging

import numpy as np
import pytest

from conftest import SHARED_DATASETS
from detpact.errors import DetpactError
from detpact.evaluation.coco import (
    HEADLINE_KEYS,
    ImageDetections,
    ImageGT,
    evaluate_coco_json,
    evaluate_detections,
    format_table,
    to_coco_gt,
    to_coco_results,
)

FIXTURES = SHARED_DATASETS / "coco_eval_fixtures"
TOL = 1e-9


# ---------------------------------------------------------------- helpers


def _load(rel: str):
    path = FIXTURES / rel
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    return json.loads(path.read_text())


def _reference_run(gt_rel: str, dt_rel: str) -> dict:
    runs = _load("pycocotools_reference_stats.json")["runs"]
    return next(r for r in runs if r["gt"] == gt_rel and r["dt"] == dt_rel and r["iouType"] == "bbox")


def _as_coco(value: float | None) -> float:
    return -1.0 if value is None else value  # we report COCO's -1 ("undefined") as None


def _pycocotools(gt: dict, results: list[dict], max_dets: list[int]) -> tuple[list[float], dict, dict]:
    """pycocotools' 12 stats and per-category AP / AP50 (area all, last maxDets)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T, R, K, A, M]

    def mean(p: np.ndarray) -> float:
        return float(p[p > -1].mean()) if (p > -1).any() else -1.0

    stats = [float(s) for s in ev.stats]
    if 100 not in max_dets:
        # pycocotools reads stats[0] at a hard-coded maxDets=100 (cocoapi#584): the
        # silent -1 we must not report. The number it should have given:
        assert stats[0] == -1.0
        stats[0] = mean(precision[:, :, :, 0, -1])
    ap = {c: mean(precision[:, :, k, 0, -1]) for k, c in enumerate(ev.params.catIds)}
    ap50 = {c: mean(precision[0, :, k, 0, -1]) for k, c in enumerate(ev.params.catIds)}
    return stats, ap, ap50


def _assert_equals_pycocotools(gt: dict, results: list[dict], max_det: int) -> dict:
    ours = evaluate_coco_json(gt, results, max_det=max_det)
    stats, ap, ap50 = _pycocotools(gt, results, [1, 10, max_det])
    for key, ref in zip(HEADLINE_KEYS, stats, strict=True):
        assert _as_coco(ours[key]) == pytest.approx(ref, abs=TOL), key
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for cat_id, name in names.items():
        assert _as_coco(ours["per_class"][name]) == pytest.approx(ap[cat_id], abs=TOL), name
        assert _as_coco(ours["per_class_ap50"][name]) == pytest.approx(ap50[cat_id], abs=TOL), name
    return ours


def _coco_case(num_images: int, num_cats: int, gts: list[tuple], dets: list[tuple]) -> tuple[dict, list[dict]]:
    """gts: (image, cat, x, y, w, h[, iscrowd[, area]]); dets: (image, cat, x, y, w, h, score)."""
    annotations = []
    for i, (img, cat, x, y, w, h, *extra) in enumerate(gts):
        iscrowd = extra[0] if extra else 0
        area = extra[1] if len(extra) > 1 else w * h
        annotations.append({
            "id": i + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
            "area": area, "iscrowd": iscrowd,
        })  # fmt: skip
    gt = {
        "images": [{"id": i, "width": 640, "height": 480} for i in range(1, num_images + 1)],
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_cats + 1)],
        "annotations": annotations,
    }
    results = [
        {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": s} for img, cat, x, y, w, h, s in dets
    ]
    return gt, results


# ------------------------------------------------- hand-made golden cases


def _tied_scores(reverse: bool = False):
    gts = [(1, 1, 10, 10, 50, 50), (1, 1, 100, 100, 40, 40), (2, 1, 30, 30, 60, 60)]
    dets = [
        (1, 1, 300, 300, 30, 30, 0.5),  # FP
        (1, 1, 12, 12, 50, 50, 0.5),  # TP at low IoU thresholds
        (1, 1, 100, 100, 40, 40, 0.5),  # exact TP
        (2, 1, 400, 10, 20, 20, 0.5),  # FP
        (2, 1, 30, 30, 60, 60, 0.5),  # exact TP
        (2, 1, 32, 30, 60, 60, 0.9),
    ]
    return _coco_case(2, 1, gts, dets[::-1] if reverse else dets)


def _duplicates():
    gts = [(1, 1, 50, 50, 100, 80), (1, 1, 300, 200, 60, 60)]
    dets = [
        (1, 1, 50, 50, 100, 80, 0.9),
        (1, 1, 51, 50, 100, 80, 0.8),  # duplicate of an already matched GT: FP
        (1, 1, 50, 52, 99, 80, 0.7),  # and again
        (1, 1, 302, 198, 60, 61, 0.6),
    ]
    return _coco_case(1, 1, gts, dets)


def _image_without_gt():
    gts = [(1, 1, 10, 10, 80, 80), (2, 2, 200, 100, 50, 120)]
    dets = [
        (3, 1, 10, 10, 80, 80, 0.95),  # image 3 has no GT at all: FPs for classes 1 and 2
        (3, 2, 5, 5, 40, 40, 0.9),
        (1, 1, 12, 10, 80, 78, 0.8),
        (2, 2, 200, 100, 50, 120, 0.7),
    ]
    return _coco_case(3, 2, gts, dets)


def _class_without_gt():
    gts = [(1, 1, 10, 10, 80, 80), (2, 2, 200, 100, 50, 120), (2, 1, 20, 300, 40, 40)]
    dets = [
        (1, 3, 10, 10, 80, 80, 0.99),  # class 3 has no GT: COCO cannot score it
        (2, 3, 0, 0, 30, 30, 0.98),
        (1, 1, 10, 10, 80, 80, 0.7),
        (2, 1, 25, 305, 40, 40, 0.6),
        (2, 2, 200, 110, 50, 120, 0.5),
    ]
    return _coco_case(2, 3, gts, dets)


def _crowd_and_area():
    gts = [
        (1, 1, 0, 0, 200, 200, 1, 30000),  # crowd region: matches many, counts as nothing
        (1, 1, 300, 300, 100, 100, 0, 500),  # box area 10000, but `area` says small
        (2, 1, 50, 50, 20, 20, 0, 400),
    ]
    dets = [
        (1, 1, 10, 10, 50, 50, 0.9),  # inside the crowd: ignored
        (1, 1, 100, 100, 60, 60, 0.85),  # inside the crowd: ignored
        (1, 1, 300, 300, 100, 100, 0.8),
        (2, 1, 52, 50, 20, 20, 0.7),
        (2, 1, 400, 300, 100, 100, 0.6),  # large FP
    ]
    return _coco_case(2, 1, gts, dets)


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 500, size=(n, 2))
    wh = rng.uniform(4, 150, size=(n, 2))
    return np.round(np.concatenate([xy, wh], axis=1), 1)  # [n, 4] xywh


def _many_dets(seed: int = 0, dets_per_pair: int = 350):
    """More detections per image per class than max_det (pycocotools caps per class)."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for img in (1, 2):
        for cat in (1, 2):
            boxes = _random_boxes(rng, 12)
            gts += [(img, cat, *b) for b in boxes.tolist()]
            # jittered copies of the GT boxes plus clutter; scores rounded to force ties
            near = boxes[rng.integers(0, 12, dets_per_pair)] + rng.normal(0, 6, (dets_per_pair, 4))
            near[:, 2:] = np.abs(near[:, 2:]) + 1
            scores = np.round(rng.uniform(0, 1, dets_per_pair), 2)
            dets += [(img, cat, *b, s) for b, s in zip(near.tolist(), scores.tolist(), strict=True)]
    return _coco_case(2, 2, gts, dets)


def _random_mixed(seed: int = 1):
    """Several images (one empty), three classes, crowds, area != box area, ties."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for img in range(1, 7):
        n = 0 if img == 4 else int(rng.integers(1, 8))
        for b in _random_boxes(rng, n).tolist():
            cat = int(rng.integers(1, 4))
            crowd = int(rng.uniform() < 0.1)
            area = b[2] * b[3] * float(rng.uniform(0.3, 1.0))  # like a mask area
            gts.append((img, cat, *b, crowd, area))
            for _ in range(int(rng.integers(0, 4))):
                jitter = (np.array(b) + rng.normal(0, 8, 4)).tolist()
                jitter[2], jitter[3] = abs(jitter[2]) + 1, abs(jitter[3]) + 1
                dets.append((img, cat, *jitter, round(float(rng.uniform()), 1)))
        for b in _random_boxes(rng, int(rng.integers(0, 5))).tolist():
            dets.append((img, int(rng.integers(1, 4)), *b, round(float(rng.uniform()), 1)))
    return _coco_case(6, 3, gts, dets)


GOLDEN_CASES = {
    "tied_scores": (_tied_scores, 100),
    "tied_scores_reversed": (lambda: _tied_scores(reverse=True), 100),
    "duplicates": (_duplicates, 100),
    "image_without_gt": (_image_without_gt, 100),
    "class_without_gt": (_class_without_gt, 100),
    "crowd_and_area": (_crowd_and_area, 100),
    "many_dets_maxdet100": (_many_dets, 100),
    "many_dets_maxdet300": (_many_dets, 300),
    "random_mixed": (_random_mixed, 100),
    "random_mixed_maxdet10": (_random_mixed, 10),
}


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_matches_pycocotools_on_edge_cases(name):
    make, max_det = GOLDEN_CASES[name]
    gt, results = make()
    _assert_equals_pycocotools(gt, results, max_det)


def test_tie_order_follows_input_order_like_pycocotools():
    # cocoapi#650: with tied scores the input order decides AP. evaluate_coco_json
    # keeps the caller's order (both orders == pycocotools above); they must differ
    # here or the tied_scores cases would test nothing.
    forward = evaluate_coco_json(*_tied_scores())
    backward = evaluate_coco_json(*_tied_scores(reverse=True))
    assert forward["map50_95"] != pytest.approx(backward["map50_95"], abs=1e-6)


def test_max_det_caps_per_class_and_never_reports_minus_one():
    gt, results = _many_dets()
    at100 = evaluate_coco_json(gt, results, max_det=100)
    at300 = evaluate_coco_json(gt, results, max_det=300)
    assert at100["max_det"] == 100 and at300["max_det"] == 300
    assert at300["ar_max"] > at100["ar_max"]  # 350 dets per (image, class): the cap bites
    assert at300["map50_95"] is not None and at300["map50_95"] >= 0.0


def test_class_without_gt_is_none_and_its_detections_are_counted():
    gt, results = _class_without_gt()
    out = evaluate_coco_json(gt, results)
    assert out["per_class"]["class3"] is None and out["per_class_ap50"]["class3"] is None
    assert out["no_gt_class_dets"] == {"class3": 2}


# ------------------------------------------------------------ fixtures


def test_val2014_100_bbox_equals_pycocotools_reference():
    gt = _load("val2014_100/instances_val2014_100.json")
    results = _load("val2014_100/instances_val2014_fakebbox100_results.json")
    ref = _reference_run(
        "val2014_100/instances_val2014_100.json", "val2014_100/instances_val2014_fakebbox100_results.json"
    )
    out = evaluate_coco_json(gt, results)
    for key, ref_value in zip(HEADLINE_KEYS, ref["stats"].values(), strict=True):
        assert out[key] == pytest.approx(ref_value, abs=TOL), key
    names = {str(c["id"]): c["name"] for c in gt["categories"]}
    for cat_id, ref_ap in ref["per_category_area_all_maxDets100"].items():
        assert _as_coco(out["per_class"][names[cat_id]]) == pytest.approx(ref_ap["AP"], abs=TOL)
        assert _as_coco(out["per_class_ap50"][names[cat_id]]) == pytest.approx(ref_ap["AP50"], abs=TOL)
    assert (out["num_images"], out["num_gt"], out["num_dets"]) == (100, 830, 734)
    json.dumps(out)  # plain Python types only


def test_fce_small_undefined_area_metrics_are_none():
    gt = _load("fce_small/gt_dataset.json")
    results = _load("fce_small/dt_dataset.json")
    ref = _reference_run("fce_small/gt_dataset.json", "fce_small/dt_dataset.json")
    out = evaluate_coco_json(gt, results)
    for key, ref_value in zip(HEADLINE_KEYS, ref["stats"].values(), strict=True):
        assert _as_coco(out[key]) == pytest.approx(ref_value, abs=TOL), key
    assert out["map_small"] is None and out["ar_small"] is None  # no small GT; -1 in COCO


def test_is_quiet_and_leaves_inputs_untouched(capsys):
    gt, results = _random_mixed()
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate_coco_json(gt, results)
    assert capsys.readouterr().out == ""
    assert gt == gt_before and results == results_before


def test_unknown_category_and_bad_max_det_raise():
    gt, results = _duplicates()
    with pytest.raises(DetpactError, match="category_id"):
        evaluate_coco_json(gt, [dict(results[0], category_id=7)])
    with pytest.raises(DetpactError, match="max_det"):
        evaluate_coco_json(gt, results, max_det=5)


def test_results_missing_a_field_raise():
    gt, results = _duplicates()
    for key in ("bbox", "score", "image_id"):
        with pytest.raises(DetpactError, match="bbox and score"):
            evaluate_coco_json(gt, [{k: v for k, v in r.items() if k != key} for r in results])


def test_no_gt_at_all_is_undefined_not_a_crash():
    gt, results = _coco_case(2, 2, [], [(1, 1, 10, 10, 20, 20, 0.9)])
    out = evaluate_coco_json(gt, results)
    assert all(out[k] is None for k in HEADLINE_KEYS)
    assert out["per_class"] == {"class1": None, "class2": None}
    assert out["no_gt_class_dets"] == {"class1": 1, "class2": 0}


# ------------------------------------------------------ evaluate_detections

CLASSES = ["cat", "dog", "bird"]


def _scene() -> tuple[list[ImageGT], list[ImageDetections]]:
    """Two images with cats and dogs, no birds; detections exact, with tied scores."""
    gts = [
        ImageGT(7, 640, 480, np.array([[10, 10, 110, 90], [200, 50, 260, 200.5]]), np.array([0, 1])),
        ImageGT(9, 320, 240, np.array([[5, 5, 45, 45]]), np.array([0])),
    ]
    dets = [
        ImageDetections(7, gts[0].boxes.copy(), np.array([0.9, 0.8]), np.array([0, 1])),
        ImageDetections(9, gts[1].boxes.copy(), np.array([0.7]), np.array([0])),
    ]
    return gts, dets


def test_perfect_detections_score_one():
    gts, dets = _scene()
    out = evaluate_detections(gts, dets, CLASSES)
    for key in ("map50_95", "map50", "map75", "ar1", "ar10", "ar_max"):
        assert out[key] == pytest.approx(1.0, abs=TOL), key
    assert out["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0), "bird": None}
    assert (out["num_images"], out["num_gt"], out["num_dets"]) == (2, 3, 3)
    json.dumps(out)


def test_boxes_are_converted_from_xyxy():
    # xyxy -> xywh and area = w * h: a 20x20 box is small (a w=x2 mix-up would make it
    # 50x50, medium); the shifted 200x200 box has IoU 32000/48000 = 0.667, so it is a
    # TP at IoU .50-.65 (4 of 10 thresholds) and AP_large = 0.4.
    gts = [ImageGT(1, 640, 480, np.array([[30.0, 30.0, 50.0, 50.0], [100, 100, 300, 300]]), np.array([0, 0]))]
    shifted = np.array([[30.0, 30.0, 50.0, 50.0], [100, 140, 300, 340]])
    dets = [ImageDetections(1, shifted, np.array([0.9, 0.8]), np.array([0, 0]))]
    out = evaluate_detections(gts, dets, ["cat"])
    assert out["map_small"] == pytest.approx(1.0)
    assert out["map_medium"] is None  # no GT between 32**2 and 96**2
    assert out["map_large"] == pytest.approx(0.4)
    assert out["map50"] == pytest.approx(1.0)


def test_crowd_ground_truth_is_an_ignore_region():
    # One real cat and one crowd region of cats. A detection on the crowd region is
    # neither a TP nor an FP: AP stays 1.0; the crowd box is not counted in num_gt.
    boxes = np.array([[10.0, 10.0, 60.0, 60.0], [200, 200, 400, 400]])
    gts = [ImageGT(1, 640, 480, boxes, np.array([0, 0]), np.array([False, True]))]
    assert [a["iscrowd"] for a in to_coco_gt(gts, ["cat"])["annotations"]] == [0, 1]
    dets = [ImageDetections(1, np.array([[10.0, 10.0, 60.0, 60.0], [250, 250, 350, 350]]), np.array([0.5, 0.9]),
                            np.array([0, 0]))]
    out = evaluate_detections(gts, dets, ["cat"])
    assert out["map50_95"] == pytest.approx(1.0) and out["num_gt"] == 1
    plain = evaluate_detections([ImageGT(1, 640, 480, boxes, np.array([0, 0]))], dets, ["cat"])
    assert plain["map50_95"] < 1.0  # the same boxes without the flag: a miss and an FP


def test_class_without_gt_is_none():
    gts, dets = _scene()
    dets.append(ImageDetections(9, np.array([[100, 100, 150, 150]]), np.array([0.95]), np.array([2])))
    out = evaluate_detections(gts, dets, CLASSES)
    assert out["per_class"]["bird"] is None and out["per_class_ap50"]["bird"] is None
    assert out["no_gt_class_dets"] == {"bird": 1}
    assert out["map50_95"] == pytest.approx(1.0)  # COCO does not see FPs on GT-less classes


def test_detection_order_does_not_matter():
    # Tied scores, a TP and an FP per class. Fed in input order they change AP
    # (cocoapi#650, checked at the end); evaluate_detections ranks ties by content.
    empty = np.zeros((0, 4))
    gts = [
        ImageGT(1, 640, 480, np.array([[10, 10, 60, 60], [300, 300, 330, 330]]), np.array([0, 1])),
        ImageGT(2, 64, 64, empty, np.zeros(0, dtype=int)),
    ]
    boxes = np.array([[400, 10, 450, 60], [10, 10, 60, 60], [300, 300, 330, 330], [0, 200, 40, 240]])
    scores = np.full(4, 0.5)
    labels = np.array([0, 0, 1, 1])

    def run(perm: list[int], reverse_images: bool) -> dict:
        dets = [
            ImageDetections(1, boxes[perm], scores[perm], labels[perm]),
            ImageDetections(2, empty, np.zeros(0), np.zeros(0, dtype=int)),
        ]
        return evaluate_detections(gts, dets[::-1] if reverse_images else dets, ["a", "b"])

    outs = [run([0, 1, 2, 3], False), run([1, 0, 3, 2], True), run([3, 2, 1, 0], False)]
    assert outs[0] == outs[1] == outs[2]

    gt, _ = _coco_case(1, 1, [(1, 1, 10, 10, 50, 50)], [])
    fp_first = [
        {"image_id": 1, "category_id": 1, "bbox": [400, 10, 50, 50], "score": 0.5},
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.5},
    ]
    assert evaluate_coco_json(gt, fp_first)["map50_95"] == pytest.approx(0.5)
    assert evaluate_coco_json(gt, fp_first[::-1])["map50_95"] == pytest.approx(1.0)


def test_empty_detections_give_zero_with_warning(caplog):
    gts, _ = _scene()
    empty = [ImageDetections(7, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))]
    for dets in ([], empty):
        with caplog.at_level(logging.WARNING, logger="detpact.evaluation.coco"):
            out = evaluate_detections(gts, dets, CLASSES)
        assert "no detections" in caplog.text
        assert out["map50_95"] == 0.0 and out["map50"] == 0.0 and out["ar_max"] == 0.0
        assert all(out[k] in (0.0, None) for k in HEADLINE_KEYS)
        assert out["per_class"] == {"cat": 0.0, "dog": 0.0, "bird": None}
        caplog.clear()


def test_unknown_image_id_raises_naming_it():
    gts, dets = _scene()
    dets.append(ImageDetections(12345, np.array([[0, 0, 10, 10]]), np.array([0.5]), np.array([0])))
    with pytest.raises(DetpactError, match="12345"):
        evaluate_detections(gts, dets, CLASSES)


def test_bad_inputs_raise_detpact_error():
    gts, dets = _scene()
    one_box = np.array([[0.0, 0.0, 5.0, 5.0]])
    bad_label = ImageDetections(7, one_box, np.array([0.5]), np.array([3]))  # only 3 classes
    with pytest.raises(DetpactError, match="class ids"):
        evaluate_detections(gts, [bad_label], CLASSES)
    swapped = ImageDetections(7, one_box[:, [2, 1, 0, 3]], np.array([0.5]), np.array([0]))  # x1 > x2
    with pytest.raises(DetpactError, match="x2 >= x1"):
        evaluate_detections(gts, [swapped], CLASSES)
    with pytest.raises(DetpactError, match="finite score"):
        evaluate_detections(gts, [ImageDetections(7, one_box, np.array([np.nan]), np.array([0]))], CLASSES)
    with pytest.raises(DetpactError, match="unique"):
        evaluate_detections(gts + gts[:1], dets, CLASSES)


def test_format_table_shows_metrics_and_classes():
    gts, dets = _scene()
    text = format_table(evaluate_detections(gts, dets, CLASSES, max_det=300))
    assert "AP @[.50:.95]" in text and "AR maxDets=300" in text
    assert "bird" in text and "(no GT)" in text and "1.0000" in text


def test_random_scenes_match_pycocotools_through_evaluate_detections():
    # evaluate_detections == pycocotools fed the same boxes, converted independently
    # here and listed in our documented rank order (-score, image, label, x1, y1, x2, y2).
    rng = np.random.default_rng(3)
    gts, dets = [], []
    for img in range(1, 6):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 120, (n, 2))], axis=1)  # [n, 4] xyxy
        gts.append(ImageGT(img, 640, 480, boxes, rng.integers(0, 2, n)))
        det_boxes = np.concatenate([boxes + rng.uniform(-6, 6, (n, 4)), [[10, 10, 50, 60]]])
        dets.append(ImageDetections(img, det_boxes, np.round(rng.uniform(0, 1, n + 1), 1), rng.integers(0, 2, n + 1)))
    ours = evaluate_detections(gts, dets, ["a", "b"])

    def xywh(b: list[float]) -> list[float]:
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    annotations = []
    for g in gts:
        for b, label in zip(g.boxes.tolist(), g.labels.tolist(), strict=True):
            w, h = xywh(b)[2:]
            annotations.append({"id": len(annotations) + 1, "image_id": g.image_id, "category_id": label + 1,
                                "bbox": xywh(b), "area": w * h, "iscrowd": 0})  # fmt: skip
    gt = {
        "images": [{"id": g.image_id, "width": g.width, "height": g.height} for g in gts],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": annotations,
    }
    rows = sorted(
        (-s, d.image_id, label, *b)
        for d in dets
        for b, s, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True)
    )
    results = [{"image_id": r[1], "category_id": r[2] + 1, "bbox": xywh(list(r[3:])), "score": -r[0]} for r in rows]
    stats, ap, _ = _pycocotools(gt, results, [1, 10, 100])
    for key, ref in zip(HEADLINE_KEYS, stats, strict=True):
        assert _as_coco(ours[key]) == pytest.approx(ref, abs=TOL), key
    assert [_as_coco(ours["per_class"][n]) for n in ("a", "b")] == pytest.approx([ap[1], ap[2]], abs=TOL)


def test_to_coco_results_ranks_like_a_tuple_sort():
    # The ranking is a numpy lexsort; it must equal sorting (-score, image_id, label,
    # x1, y1, x2, y2) tuples, with ties at every level: few distinct scores (0.0 next to
    # -0.0), labels and coordinates, exact duplicates, images listed out of order.
    rng = np.random.default_rng(5)
    dets = []
    for img in (3, 1, 2):
        x1y1 = rng.integers(0, 3, (80, 2)).astype(np.float64)
        boxes = np.concatenate([x1y1, x1y1 + rng.integers(1, 3, (80, 2))], axis=1)  # [80, 4] xyxy
        dets.append(ImageDetections(img, boxes, rng.choice([0.0, -0.0, 0.25, 0.5], 80), rng.integers(0, 2, 80)))
    rows = sorted(
        (-s, d.image_id, label, *b)
        for d in dets
        for b, s, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True)
    )
    expected = [
        {"image_id": img, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": -neg}
        for neg, img, label, x1, y1, x2, y2 in rows
    ]
    assert to_coco_results(dets, num_classes=2) == expected


def test_garbage_collector_state_is_restored():
    # The evaluators pause the cyclic collector for speed; they must hand it back as found.
    gts, dets = _scene()
    assert gc.isenabled()
    evaluate_detections(gts, dets, CLASSES)
    assert gc.isenabled()
    with pytest.raises(DetpactError):
        evaluate_detections(gts, dets, CLASSES, max_det=5)
    assert gc.isenabled()
    gc.disable()
    try:
        evaluate_coco_json(*_duplicates())
        assert not gc.isenabled()
    finally:
        gc.enable()
