"""Operating-point metrics (evaluation/operating.py) on cases counted by hand."""

import numpy as np
import pytest

from detpact.evaluation.coco import ImageDetections, ImageGT
from detpact.evaluation.operating import SWEEP, operating_point


def gt(image_id, boxes, labels, crowd=None):
    return ImageGT(image_id, 100, 100, np.array(boxes, float).reshape(-1, 4), np.array(labels, np.int64),
                   None if crowd is None else np.array(crowd, bool))


def det(image_id, boxes, scores, labels):
    return ImageDetections(image_id, np.array(boxes, float).reshape(-1, 4), np.array(scores, float),
                           np.array(labels, np.int64))


def test_counts_precision_recall_f1_and_mean_iou():
    gts = [gt(0, [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0]), gt(1, [[0, 0, 20, 20]], [1])]
    dets = [
        det(0, [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 65]], [0.9, 0.8, 0.7], [0, 0, 0]),  # TP, dup FP, TP iou 2/3
        det(1, [[0, 0, 20, 20], [30, 30, 40, 40]], [0.95, 0.1], [0, 1]),  # wrong class FP; below threshold
    ]
    op = operating_point(gts, dets, ["a", "b"], score_threshold=0.25, iou_threshold=0.5)
    assert (op["tp"], op["fp"], op["fn"]) == (2, 2, 1)
    assert op["precision"] == pytest.approx(0.5) and op["recall"] == pytest.approx(2 / 3)
    assert op["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert op["mean_iou"] == pytest.approx((1.0 + 100 / 150) / 2)
    assert op["per_class"]["b"] == {"precision": None, "recall": 0.0, "f1": None, "mean_iou": None,
                                    "tp": 0, "fp": 0, "fn": 1}
    sweep = {row["iou"]: row for row in op["iou_sweep"]}
    assert list(sweep) == list(SWEEP)
    assert sweep[0.65]["tp"] == 2 and sweep[0.7]["tp"] == 1  # the 2/3-IoU match drops out above .65


def test_crowd_regions_are_neither_hits_nor_misses():
    gts = [gt(0, [[0, 0, 50, 50], [60, 60, 70, 70]], [0, 0], crowd=[True, False])]
    dets = [det(0, [[5, 5, 15, 15], [60, 60, 70, 70]], [0.9, 0.8], [0, 0])]  # inside the crowd box; TP
    op = operating_point(gts, dets, ["a"], 0.25, 0.5)
    assert (op["tp"], op["fp"], op["fn"]) == (1, 0, 0)


def test_operating_iou_outside_the_sweep_and_empty_inputs():
    gts = [gt(0, [], []), gt(1, [[0, 0, 10, 10]], [0])]
    op = operating_point(gts, [det(1, [[0, 0, 10, 9]], [0.5], [0])], ["a"], 0.3, iou_threshold=0.92)
    assert op["iou_threshold"] == 0.92 and op["tp"] == 0 and op["fp"] == 1  # IoU 0.9
    assert [row["iou"] for row in op["iou_sweep"]] == list(SWEEP)
    none = operating_point(gts, [], ["a"])
    assert none["precision"] is None and none["recall"] == 0.0 and none["fn"] == 1
