"""Subset scenarios: which images of a split a rule keeps, as pure functions over `Sample`s.

Each rule returns the indices (in split order) of the images it selects. A selected image
is scored whole: all of its ground truth and all of its detections count, not only the
objects that made it qualify. Scoring single objects would need the detections matched to
them first, and a whole image is what a deployment would see (COCO's APs/APm/APl split the
objects instead; the small-objects subset complements them with the images they sit in).
Objects marked `ignore` (COCO crowd, VOC difficult) never make an image qualify.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detpact.data.formats import Sample
from detpact.errors import DetpactError

SUBSETS: tuple[str, ...] = ("small_objects", "crowded", "truncated", "classes")
SMALL_AREA = 32.0**2  # COCO's "small": box area below 32 x 32 pixels of the original image


def _counted(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The sample's boxes [N, 4] and labels [N] that are not marked ignore."""
    keep = slice(None) if sample.ignore is None else ~sample.ignore
    return sample.boxes[keep].reshape(-1, 4), sample.labels[keep]


def small_objects(samples: Sequence[Sample], max_area: float = SMALL_AREA) -> list[int]:
    """Images with at least one object whose box area (original pixels) is below `max_area`."""
    selected = []
    for index, sample in enumerate(samples):
        boxes, _ = _counted(sample)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        if np.any(areas < max_area):
            selected.append(index)
    return selected


def crowded(samples: Sequence[Sample], min_objects: int) -> list[int]:
    """Images with at least `min_objects` objects."""
    return [index for index, sample in enumerate(samples) if len(_counted(sample)[1]) >= min_objects]


def truncated(samples: Sequence[Sample], margin: float = 1.0) -> list[int]:
    """Images with at least one object cut by the frame: a box edge within `margin` pixels
    of (or beyond) the image border."""
    selected = []
    for index, sample in enumerate(samples):
        boxes, _ = _counted(sample)
        near = ((boxes[:, 0] <= margin) | (boxes[:, 1] <= margin)
                | (boxes[:, 2] >= sample.width - margin) | (boxes[:, 3] >= sample.height - margin))
        if np.any(near):
            selected.append(index)
    return selected


def with_classes(samples: Sequence[Sample], names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Images holding at least one object of any class in `names` (names from `class_names`,
    the dataset's classes in class-id order)."""
    unknown = [name for name in names if name not in class_names]
    if unknown:
        raise DetpactError(f"Unknown class name(s) {', '.join(map(repr, unknown))} in a 'classes' subset: the "
                           f"dataset's classes are {', '.join(class_names)}.")
    if not names:
        raise DetpactError("A 'classes' subset needs at least one class name in 'classes'.")
    wanted = np.array([class_names.index(name) for name in names], np.int64)
    return [index for index, sample in enumerate(samples) if np.isin(_counted(sample)[1], wanted).any()]
