"""Subset rules select exactly the images they name, on a hand-built split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detpact.data.formats import Sample
from detpact.errors import DetpactError
from detpact.robustness.subsets import crowded, small_objects, truncated, with_classes

CLASSES = ["circle", "square", "triangle"]


def sample(name: str, boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None,
           size: tuple[int, int] = (200, 100)) -> Sample:
    return Sample(Path(f"{name}.png"), size[0], size[1], np.array(boxes, np.float32).reshape(-1, 4),
                  np.array(labels, np.int64), None if ignore is None else np.array(ignore, bool))


SPLIT = [
    sample("empty", [], []),                                                   # 0: background image
    sample("one_small", [[50, 40, 80, 70]], [0]),                              # 1: 30x30 = 900 < 1024
    sample("exactly_32", [[50, 40, 82, 72]], [1]),                             # 2: 32x32 = 1024, not small
    sample("crowd_of_4", [[10, 10, 60, 60], [70, 10, 120, 60], [130, 10, 180, 60], [10, 65, 60, 95]],
           [1, 1, 2, 2]),                                                      # 3: 4 objects, 50x50 / 50x30
    sample("left_edge", [[0, 20, 60, 80]], [2]),                               # 4: touches x = 0
    sample("near_bottom", [[100, 30, 160, 99.5]], [1]),                        # 5: bottom 0.5 px from 100
    sample("ignored_small", [[50, 40, 60, 50], [20, 20, 90, 90]], [0, 1], [True, False]),  # 6: small is ignored
    sample("ignored_edge", [[0, 0, 50, 50], [60, 20, 120, 80]], [2, 0], [True, False]),    # 7: edge is ignored
    sample("three", [[40, 20, 100, 80], [110, 20, 170, 80], [20, 85, 30, 95]], [1, 1, 0]),  # 8: 3, one small
]


def test_small_objects_is_below_coco_small_area_in_original_pixels():
    assert small_objects(SPLIT) == [1, 8]
    assert small_objects(SPLIT, max_area=1025) == [1, 2, 8]
    assert small_objects(SPLIT, max_area=1) == []


def test_crowded_counts_objects_that_are_not_ignored():
    assert crowded(SPLIT, min_objects=3) == [3, 8]
    assert crowded(SPLIT, min_objects=4) == [3]
    assert crowded(SPLIT, min_objects=2) == [3, 8]  # 6 and 7 have one counted object each
    assert crowded(SPLIT, min_objects=0) == list(range(len(SPLIT)))


def test_truncated_is_a_box_edge_within_the_margin_of_the_border():
    assert truncated(SPLIT, margin=1.0) == [4, 5]
    assert truncated(SPLIT, margin=0.0) == [4]
    # 3 starts at 10 px; 6 ends at 90 px of 100, 8 at 95
    assert truncated(SPLIT, margin=10.0) == [3, 4, 5, 6, 8]


def test_classes_selects_images_with_any_named_class():
    assert with_classes(SPLIT, ["circle"], CLASSES) == [1, 7, 8]  # 6's circle is ignored, 7's is not
    assert with_classes(SPLIT, ["triangle", "circle"], CLASSES) == [1, 3, 4, 7, 8]
    assert with_classes(SPLIT, ["square", "triangle", "circle"], CLASSES) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_unknown_or_no_class_name_is_refused_naming_the_classes():
    with pytest.raises(DetpactError, match="'hexagon'.*circle, square, triangle"):
        with_classes(SPLIT, ["circle", "hexagon"], CLASSES)
    with pytest.raises(DetpactError, match="at least one class"):
        with_classes(SPLIT, [], CLASSES)
