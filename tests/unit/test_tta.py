"""Test-time augmentation: views, augment / unaugment round trips, and merging with
answers worked out by hand (weighted boxes fusion and class-wise NMS)."""

from __future__ import annotations

import math

import pytest
import torch

from detpact.errors import DetpactError
from detpact.inference.tta import (
    TTAView,
    augment,
    augmented_size,
    merge_detections,
    tta_views,
    unaugment_boxes,
)
from detpact.models.postprocess import Detections


def dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> Detections:
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        locations=torch.arange(len(scores), dtype=torch.int64),
    )


def no_dets() -> Detections:
    return dets([], [], [])


def assert_empty(out: Detections) -> None:
    assert out.boxes.shape == (0, 4) and out.boxes.dtype == torch.float32
    assert out.scores.shape == (0,) and out.scores.dtype == torch.float32
    assert out.labels.shape == (0,) and out.labels.dtype == torch.int64
    assert out.locations.shape == (0,) and out.locations.dtype == torch.int64


# ---------------------------------------------------------------- views


def test_views_identity_first_then_scales_by_flip_without_duplicates():
    views = tta_views([1.0, 0.5, 0.5, 2], flip=True)
    assert views == [
        TTAView(1.0, False),
        TTAView(1.0, True),
        TTAView(0.5, False),
        TTAView(0.5, True),
        TTAView(2.0, False),
        TTAView(2.0, True),
    ]
    assert tta_views([0.5, 1.0, 2.0], flip=False) == [TTAView(1.0, False), TTAView(0.5, False), TTAView(2.0, False)]
    assert tta_views([], flip=False) == [TTAView(1.0, False)]
    assert tta_views([], flip=True) == [TTAView(1.0, False)]


@pytest.mark.parametrize("scale", [0, -0.5, math.nan, math.inf, "big", True])
def test_views_reject_bad_scales(scale):
    with pytest.raises(DetpactError, match="TTA scale"):
        tta_views([1.0, scale], flip=False)


# ---------------------------------------------------------------- augment / unaugment


def test_augmented_size_is_a_multiple_of_the_stride_and_at_least_one():
    assert augmented_size(640, TTAView(1.0, True)) == 640
    assert augmented_size(64, TTAView(0.5, False)) == 32
    assert augmented_size(64, TTAView(0.6, False)) == 32  # 38.4 -> 1 stride
    assert augmented_size(64, TTAView(0.1, False)) == 32  # never below one stride
    assert augmented_size(640, TTAView(1.17, False)) == 736  # 748.8 -> 23 strides
    assert augmented_size(64, TTAView(1.5, False), stride=16) == 96


def test_augment_identity_flip_and_shape():
    images = torch.rand(2, 3, 64, 64)
    assert augment(images, TTAView(1.0, False)) is images
    assert torch.equal(augment(images, TTAView(1.0, True)), images.flip(-1))
    assert augment(images, TTAView(2.0, True)).shape == (2, 3, 128, 128)
    assert augment(images, TTAView(0.5, False)).shape == (2, 3, 32, 32)


def test_unaugment_known_box():
    # Flipped view of side 128 from an input of side 64: unflip x in [0, 128], then halve.
    boxes = torch.tensor([[98.0, 16.0, 118.0, 48.0]])
    out = unaugment_boxes(boxes, TTAView(2.0, True), input_size=64, view_size=128)
    assert torch.equal(out, torch.tensor([[5.0, 8.0, 15.0, 24.0]]))
    assert unaugment_boxes(torch.zeros(0, 4), TTAView(2.0, True), 64, 128).shape == (0, 4)


def _white_box(image: torch.Tensor) -> torch.Tensor:
    """xyxy pixel-edge box around the pixels brighter than 0.5 in a [3, H, W] image."""
    rows, cols = (image[0] > 0.5).nonzero(as_tuple=True)
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("view", tta_views([0.5, 2.0], flip=True), ids=str)
def test_augment_then_unaugment_maps_a_rectangle_back_exactly(view):
    # Even, off-centre corners: halving keeps them on whole pixels, and a flip that is
    # not undone would move the box (10..30 mirrors to 34..54).
    size, box = 64, torch.tensor([10.0, 8.0, 30.0, 24.0])
    image = torch.zeros(1, 3, size, size)
    image[:, :, 8:24, 10:30] = 1.0
    augmented = augment(image, view)
    view_size = augmented.shape[-1]
    assert view_size == augmented_size(size, view)
    seen = _white_box(augmented[0])
    expected_seen = box * view.scale
    if view.flip:
        expected_seen = torch.stack(
            [view_size - expected_seen[2], expected_seen[1], view_size - expected_seen[0], expected_seen[3]]
        )
    assert torch.equal(seen, expected_seen)
    assert torch.equal(unaugment_boxes(seen[None], view, size, view_size)[0], box)


# ---------------------------------------------------------------- weighted boxes fusion


def test_wbf_two_views_fuse_by_score_weights():
    # (0*0.9 + 2*0.6) / 1.5 = 0.8, (10*0.9 + 12*0.6) / 1.5 = 10.8; score (0.9 + 0.6) / 2 * 2/2.
    out = merge_detections([dets([[0, 0, 10, 10]], [0.9], [3]), dets([[2, 0, 12, 10]], [0.6], [3])])
    assert torch.allclose(out.boxes, torch.tensor([[0.8, 0.0, 10.8, 10.0]]))
    assert torch.allclose(out.scores, torch.tensor([0.75]))
    assert out.labels.tolist() == [3]
    assert out.locations.tolist() == [-1] and out.locations.dtype == torch.int64


def test_wbf_conf_type_max_keeps_the_best_score_and_the_weighted_box():
    views = [dets([[0, 0, 10, 10]], [0.9], [0]), dets([[2, 0, 12, 10]], [0.6], [0])]
    out = merge_detections(views, conf_type="max")
    assert torch.allclose(out.boxes, torch.tensor([[0.8, 0.0, 10.8, 10.0]]))
    assert torch.allclose(out.scores, torch.tensor([0.9]))


def test_wbf_box_found_by_one_view_of_two_gets_half_its_score():
    out = merge_detections([dets([[0, 0, 10, 10]], [0.8], [1]), no_dets()])
    assert torch.allclose(out.boxes, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert torch.allclose(out.scores, torch.tensor([0.4]))


def test_wbf_cluster_larger_than_the_views_is_not_boosted():
    # Three boxes, two views: mean score (0.9 + 0.6 + 0.3) / 3 = 0.6, times min(3, 2) / 2 = 1.
    views = [dets([[0, 0, 10, 10], [1, 0, 11, 10]], [0.9, 0.3], [0, 0]), dets([[0, 0, 10, 10]], [0.6], [0])]
    out = merge_detections(views)
    x1 = (0 * 0.9 + 1 * 0.3 + 0 * 0.6) / 1.8
    x2 = (10 * 0.9 + 11 * 0.3 + 10 * 0.6) / 1.8
    assert torch.allclose(out.boxes, torch.tensor([[x1, 0.0, x2, 10.0]]))
    assert torch.allclose(out.scores, torch.tensor([0.6]))


def test_wbf_single_view_of_separate_boxes_is_unchanged():
    view = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]], [0.5, 0.9, 0.7], [0, 0, 1])
    out = merge_detections([view])
    assert torch.equal(out.boxes, view.boxes[[1, 2, 0]])
    assert torch.equal(out.scores, view.scores[[1, 2, 0]])
    assert out.labels.tolist() == [0, 1, 0]


def test_wbf_never_merges_different_classes():
    out = merge_detections([dets([[0, 0, 10, 10]], [0.9], [0]), dets([[0, 0, 10, 10]], [0.6], [1])])
    assert torch.allclose(out.scores, torch.tensor([0.45, 0.3]))
    assert out.labels.tolist() == [0, 1]
    assert torch.equal(out.boxes, torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]]))


def test_wbf_keeps_low_iou_boxes_apart():
    # IoU of [0, 10] and [8, 18] (height 10): 20 / 180 = 0.11.
    out = merge_detections([dets([[0, 0, 10, 10]], [0.9], [0]), dets([[8, 0, 18, 10]], [0.6], [0])])
    assert torch.allclose(out.scores, torch.tensor([0.45, 0.3]))
    assert torch.equal(out.boxes, torch.tensor([[0.0, 0, 10, 10], [8.0, 0, 18, 10]]))


def test_wbf_iou_threshold_is_strict():
    # IoU of [0, 10] and [0, 5] (height 10) is 50 / 100 = 0.5 exactly: joining needs IoU > threshold.
    views = [dets([[0, 0, 10, 10]], [0.8], [0]), dets([[0, 0, 5, 10]], [0.8], [0])]
    assert len(merge_detections(views, iou_threshold=0.5).scores) == 2
    assert len(merge_detections(views, iou_threshold=0.49).scores) == 1


def test_wbf_skip_score_and_max_det():
    boxes = [[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(5)]
    out = merge_detections([dets(boxes, [0.1, 0.5, 0.9, 0.3, 0.7], [0] * 5)], skip_score=0.2, max_det=3)
    assert torch.allclose(out.scores, torch.tensor([0.9, 0.7, 0.5]))
    assert torch.equal(out.boxes, torch.tensor([boxes[2], boxes[4], boxes[1]]))


# ---------------------------------------------------------------- nms


def test_nms_keeps_the_best_box_per_class():
    # [1, 11] overlaps [0, 10] with IoU 90 / 110 = 0.82: suppressed; the other class is not.
    views = [
        dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.5], [0, 0]),
        dets([[1, 0, 11, 10], [1, 0, 11, 10]], [0.6, 0.4], [0, 2]),
    ]
    out = merge_detections(views, method="nms")
    assert torch.equal(out.boxes, torch.tensor([[0.0, 0, 10, 10], [50.0, 50, 60, 60], [1.0, 0, 11, 10]]))
    assert torch.allclose(out.scores, torch.tensor([0.9, 0.5, 0.4]))
    assert out.labels.tolist() == [0, 0, 2]
    assert out.locations.tolist() == [-1, -1, -1]
    assert len(merge_detections(views, method="nms", max_det=1).scores) == 1


# ---------------------------------------------------------------- empty inputs and errors


@pytest.mark.parametrize("method", ["wbf", "nms"])
def test_empty_inputs_give_empty_detections(method):
    assert_empty(merge_detections([no_dets(), no_dets()], method=method))
    assert_empty(merge_detections([], method=method))
    assert_empty(merge_detections([dets([[0, 0, 1, 1]], [0.1], [0])], method=method, skip_score=0.5))


def test_unknown_method_or_conf_type_lists_the_choices():
    with pytest.raises(DetpactError, match="choices: wbf, nms"):
        merge_detections([no_dets()], method="soft-nms")
    with pytest.raises(DetpactError, match="choices: avg, max"):
        merge_detections([no_dets()], conf_type="box_and_model_avg")
