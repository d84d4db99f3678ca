"""Box math against brute-force pure-Python references.

The references work box by box in Python floats, so they share no code (and no
broadcasting or sorting tricks) with `detpact.models.boxes`.
"""

from __future__ import annotations

import pytest
import torch

from detpact.models.boxes import (
    batched_nms,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_boxes,
    generalized_box_iou,
    nms,
    paired_giou,
    paired_iou,
)

# ---------------------------------------------------------------- references


def ref_area(b: list[float]) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def ref_iou(a: list[float], b: list[float]) -> float:
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = ref_area(a) + ref_area(b) - inter
    return inter / union if union > 0 else 0.0


def ref_giou(a: list[float], b: list[float]) -> float:
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = ref_area(a) + ref_area(b) - w * h
    enclosing = ref_area([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    penalty = (enclosing - union) / enclosing if enclosing > 0 else 0.0
    return ref_iou(a, b) - penalty


def ref_nms(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Textbook greedy NMS; equal scores are visited in input order."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(ref_iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


def ref_batched_nms(boxes, scores, classes, threshold) -> list[int]:
    keep: list[int] = []
    for c in set(classes):
        members = [i for i, ci in enumerate(classes) if ci == c]
        kept = ref_nms([boxes[i] for i in members], [scores[i] for i in members], threshold)
        keep += [members[k] for k in kept]
    return sorted(keep, key=lambda i: (-scores[i], i))


# ---------------------------------------------------------------- inputs


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] float32 xyxy with some zero-area and some repeated boxes."""
    xy = torch.rand(n, 2, generator=generator) * 100
    wh = torch.rand(n, 2, generator=generator) * 40
    wh[torch.rand(n, generator=generator) < 0.15, 0] = 0  # zero width
    boxes = torch.cat([xy, xy + wh], dim=1)
    repeats = torch.rand(n, generator=generator) < 0.15
    boxes[repeats] = boxes[0].clone()
    return boxes


def clustered_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] float32 boxes jittered around a few objects, so NMS has work to do.

    Coordinates are whole numbers (some negative, some boxes zero-area): areas are then
    exact in float32, so float32 IoU and the float64 reference agree on which side of
    the threshold every pair falls, even for exact ties like IoU == 0.5.
    """
    objects = torch.randint(1, 4, (), generator=generator).item()
    centres = torch.randint(-20, 200, (objects, 2), generator=generator)
    sizes = torch.randint(8, 60, (objects, 2), generator=generator)
    which = torch.randint(0, objects, (n,), generator=generator)
    jitter = torch.randint(-6, 7, (n, 4), generator=generator)
    x1y1 = centres[which] - sizes[which] // 2
    boxes = torch.cat([x1y1, x1y1 + sizes[which]], dim=1) + jitter
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])  # jitter may invert; flatten instead
    return boxes.float()


def tied_scores(n: int, generator: torch.Generator) -> torch.Tensor:
    # Few distinct values, so many scores tie and the stable order is exercised.
    return torch.randint(0, 6, (n,), generator=generator).float() / 5


# ---------------------------------------------------------------- conversions, area


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    xyxy = random_boxes(50, g).view(5, 10, 4)  # leading dims pass through
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-5)
    cxcywh = torch.rand(7, 4, generator=g)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh, atol=1e-6)
    expected = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([[3.0, 6.0, 4.0, 8.0]])), expected)


def test_box_area_clamps_inverted_sides():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 5.0, 9.0], [4.0, 0.0, 1.0, 2.0]])
    assert torch.equal(box_area(boxes), torch.tensor([6.0, 0.0, 0.0]))
    assert box_area(boxes.view(1, 3, 4)).shape == (1, 3)


# ---------------------------------------------------------------- IoU and GIoU


def test_box_iou_matches_reference():
    g = torch.Generator().manual_seed(1)
    boxes1, boxes2 = random_boxes(30, g), random_boxes(20, g)
    boxes2[:5] = boxes1[:5]  # identical pairs, zero-area ones among them
    iou, union = box_iou(boxes1, boxes2)
    a, b = boxes1.tolist(), boxes2.tolist()
    expected = torch.tensor([[ref_iou(x, y) for y in b] for x in a])
    assert iou.shape == union.shape == (30, 20)
    assert torch.isfinite(iou).all()
    assert torch.allclose(iou, expected, atol=1e-6)
    assert (union >= 0).all()


def test_box_iou_of_zero_area_boxes_is_zero():
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    line = torch.tensor([[0.0, 0.0, 0.0, 10.0]])
    iou, _ = box_iou(torch.cat([point, line]), torch.cat([point, line]))
    assert torch.equal(iou, torch.zeros(2, 2))


def test_generalized_box_iou_matches_reference_and_is_bounded():
    g = torch.Generator().manual_seed(2)
    boxes1, boxes2 = random_boxes(25, g), random_boxes(15, g)
    giou = generalized_box_iou(boxes1, boxes2)
    a, b = boxes1.tolist(), boxes2.tolist()
    expected = torch.tensor([[ref_giou(x, y) for y in b] for x in a])
    assert torch.allclose(giou, expected, atol=1e-6)
    assert (giou >= -1).all() and (giou <= 1).all()
    # Far-apart boxes approach -1; identical boxes have no penalty, so GIoU == IoU.
    far = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[99.0, 99, 100, 100]]))
    assert far < -0.99
    same = torch.diagonal(generalized_box_iou(boxes1, boxes1))
    assert torch.allclose(same, torch.diagonal(box_iou(boxes1, boxes1)[0]))


def test_paired_functions_equal_matrix_diagonals():
    g = torch.Generator().manual_seed(3)
    boxes1, boxes2 = random_boxes(40, g), random_boxes(40, g)
    iou, giou = paired_iou(boxes1, boxes2), paired_giou(boxes1, boxes2)
    assert iou.shape == giou.shape == (40,)
    assert torch.allclose(iou, torch.diagonal(box_iou(boxes1, boxes2)[0]), atol=1e-6)
    assert torch.allclose(giou, torch.diagonal(generalized_box_iou(boxes1, boxes2)), atol=1e-6)
    # Leading dims pass through: [B, Q, 4] -> [B, Q].
    assert torch.equal(paired_giou(boxes1.view(4, 10, 4), boxes2.view(4, 10, 4)), giou.view(4, 10))


DEGENERATE_PAIRS = [
    ([5.0, 5.0, 5.0, 9.0], [5.0, 5.0, 5.0, 9.0]),  # identical zero-width boxes
    ([5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]),  # identical points
    ([5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0]),  # point inside a box
    ([8.0, 8.0, 2.0, 2.0], [0.0, 0.0, 10.0, 10.0]),  # inverted (x2 < x1, y2 < y1)
    ([8.0, 8.0, 2.0, 2.0], [8.0, 8.0, 2.0, 2.0]),  # identical inverted boxes
    ([0.0, 0.0, 4.0, 0.0], [20.0, 0.0, 24.0, 0.0]),  # zero-height, disjoint, collinear
    ([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]),  # a healthy pair, for contrast
]


@pytest.mark.parametrize("fn", [paired_iou, paired_giou])
def test_paired_gradients_are_finite_for_degenerate_boxes(fn):
    pred = torch.tensor([p for p, _ in DEGENERATE_PAIRS], requires_grad=True)
    target = torch.tensor([t for _, t in DEGENERATE_PAIRS], requires_grad=True)
    value = fn(pred, target)
    assert torch.isfinite(value).all()
    assert ((value >= -1) & (value <= 1)).all()
    (1 - value).sum().backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(target.grad).all()
    assert value[-1] == 1 and value[1] == 0  # healthy pair overlaps fully, points not at all


# ---------------------------------------------------------------- clipping


def test_clip_boxes_with_int_and_per_image_bounds():
    boxes = torch.tensor([[-5.0, -2.0, 50.0, 30.0], [10.0, 10.0, 20.0, 20.0]])
    expected = torch.tensor([[0.0, 0.0, 40.0, 25.0], [10.0, 10.0, 20.0, 20.0]])
    assert torch.equal(clip_boxes(boxes, height=25, width=40), expected)
    # Per-image sizes as tensors, as an export graph passes them: boxes [B, Q, 4], size [B, 1].
    batch = torch.stack([boxes, boxes])  # [2, 2, 4]
    clipped = clip_boxes(batch, torch.tensor([[25], [15]]), torch.tensor([[40], [15]]))
    assert torch.equal(clipped[0], expected)
    assert torch.equal(clipped[1], torch.tensor([[0.0, 0.0, 15.0, 15.0], [10.0, 10.0, 15.0, 15.0]]))


# ---------------------------------------------------------------- NMS


THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


def test_nms_matches_reference_on_random_clusters():
    g = torch.Generator().manual_seed(4)
    suppressed = 0
    for case in range(40):
        n = int(torch.randint(2, 60, (), generator=g))
        boxes, scores = clustered_boxes(n, g), tied_scores(n, g)
        if case % 2:  # also float coordinates and untied scores
            boxes = boxes + torch.rand(n, 4, generator=g) * 0.5
            scores = torch.rand(n, generator=g)
        for threshold in THRESHOLDS:
            keep = nms(boxes, scores, threshold)
            expected = ref_nms(boxes.tolist(), scores.tolist(), threshold)
            assert keep.dtype == torch.int64
            assert keep.tolist() == expected, (case, threshold)
            suppressed += n - len(expected)
    assert suppressed > 1000  # the cases really exercised suppression


def test_nms_matches_reference_on_many_boxes():
    g = torch.Generator().manual_seed(5)
    boxes, scores = clustered_boxes(300, g), tied_scores(300, g)
    assert nms(boxes, scores, 0.5).tolist() == ref_nms(boxes.tolist(), scores.tolist(), 0.5)


def test_nms_iou_equal_to_threshold_is_kept():
    # IoU is exactly 0.5 (overlap 50, union 100): not strictly greater, so both stay.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 7.5], [0.0, 2.5, 10.0, 10.0]])
    assert box_iou(boxes, boxes)[0][0, 1] == 0.5
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]


def test_nms_edge_cases():
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    same = torch.tensor([[1.0, 2.0, 5.0, 6.0]]).repeat(6, 1)
    assert nms(same, torch.tensor([0.1, 0.5, 0.9, 0.2, 0.9, 0.3]), 0.5).tolist() == [2]
    assert nms(same, torch.full((6,), 0.5), 0.5).tolist() == [0]  # tie: lowest index wins
    # IoU of identical boxes is exactly 1, never > 1: all kept, ties in input order.
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9, 0.5])
    assert nms(same, scores, 1.0).tolist() == [4, 1, 2, 5, 3, 0]


def test_batched_nms_matches_per_class_reference():
    g = torch.Generator().manual_seed(6)
    for case in range(30):
        n = int(torch.randint(2, 60, (), generator=g))
        boxes, scores = clustered_boxes(n, g), tied_scores(n, g)
        classes = torch.randint(0, 4, (n,), generator=g)
        for threshold in THRESHOLDS:
            keep = batched_nms(boxes, scores, classes, threshold)
            expected = ref_batched_nms(boxes.tolist(), scores.tolist(), classes.tolist(), threshold)
            assert keep.dtype == torch.int64
            assert keep.tolist() == expected, (case, threshold)


def test_batched_nms_keeps_identical_boxes_of_different_classes():
    # Unclipped boxes with negative corners: torchvision's max + 1 offset (11 here) would
    # leave boxes 0 and 1 with IoU 0.68 after shifting, and box 0 would be lost.
    boxes = torch.tensor(
        [[-100.0, -100.0, 10.0, 10.0], [-100.0, -100.0, 10.0, 10.0], [-98.0, -99.0, 10.0, 10.0]]
    )
    classes = torch.tensor([0, 1, 1])
    keep = batched_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), classes, 0.5)
    assert keep.tolist() == [1, 0]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
