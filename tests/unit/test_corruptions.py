"""Image corruptions: same bytes for the same (image, name, severity, seed) whatever the call
order or global RNG, shape and dtype kept, strength growing with severity, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest

from detpact.errors import DetpactError
from detpact.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt, image_seed

RANDOM_CORRUPTIONS = ("gaussian_noise", "haze", "occlusion")


def scene(height: int = 144, width: int = 192) -> np.ndarray:
    """A smooth gradient with a few solid rectangles (edges for blur and JPEG to smear), at
    about the quickstart's image size."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    image[20:60, 24:80] = (230, 40, 40)
    image[80:130, 100:180] = (20, 200, 60)
    image[10:40, 140:160] = (250, 250, 250)
    image[100:104, 10:60] = (0, 0, 0)
    return image


def mean_change(image: np.ndarray, name: str, severity: int, seed: int = 7) -> float:
    return float(np.abs(corrupt(image, name, severity, seed).astype(np.int16) - image).mean())


def test_the_public_names_are_the_seven_corruptions():
    assert CORRUPTIONS == ("gaussian_noise", "blur", "brightness", "contrast", "jpeg", "haze", "occlusion")
    assert SEVERITIES == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_bytes_whatever_the_call_order_and_global_rng(name):
    image = scene()
    original = image.copy()
    first = corrupt(image, name, 3, seed=11)
    # Other corruptions in between and the global generators moved: nothing may leak in.
    for other in CORRUPTIONS:
        corrupt(image, other, 5, seed=99)
    np.random.seed(123)
    random.seed(123)
    np.random.random(1000)
    again = corrupt(image.copy(), name, 3, seed=11)
    assert first.tobytes() == again.tobytes()
    assert np.array_equal(image, original), "the input image must not be modified"
    assert first.shape == image.shape and first.dtype == np.uint8


@pytest.mark.parametrize("name", RANDOM_CORRUPTIONS)
def test_the_seed_changes_the_random_ones(name):
    image = scene()
    assert corrupt(image, name, 3, seed=1).tobytes() != corrupt(image, name, 3, seed=2).tobytes()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_changes_the_image_more_as_severity_rises(name):
    image = scene()
    changes = [mean_change(image, name, severity) for severity in SEVERITIES]
    assert changes[0] > 0.5, f"{name} at severity 1 barely changes the image: {changes}"
    assert all(low < high for low, high in zip(changes, changes[1:])), f"{name}: {changes}"


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 300, 3), (257, 31, 3)])
def test_odd_shapes_keep_their_shape(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for name in CORRUPTIONS:
        out = corrupt(image, name, 5, seed=3)
        assert out.shape == shape and out.dtype == np.uint8


def test_occlusion_patches_grow_in_place_with_severity():
    # The patch places come from the seed alone, so a milder occlusion is inside a stronger one.
    image = scene()
    covered = [np.any(corrupt(image, "occlusion", severity, seed=5) != image, axis=-1) for severity in (1, 5)]
    assert covered[0].any()
    assert np.all(covered[1][covered[0]])
    assert 0.2 < covered[1].mean() < 0.4  # about OCCLUSION_AREA[4] = 0.35, less any overlap


def test_blur_scales_with_the_image_so_it_survives_the_letterbox():
    # The same scene at twice the size, blurred and halved, is close to the small one blurred.
    import cv2

    small = scene()
    large = cv2.resize(small, (small.shape[1] * 2, small.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    shrunk = cv2.resize(corrupt(large, "blur", 4, seed=0), small.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(np.int16) - corrupt(small, "blur", 4, seed=0)).mean() < 6.0


def test_image_seed_is_stable_and_depends_on_both_parts():
    assert image_seed(0, "val/0001.png") == 2678117443239248318  # sha256: the same in every process
    seeds = {image_seed(seed, key) for seed in (0, 1) for key in ("a.png", "b.png")}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("name, severity, match", [
    ("fog", 3, "gaussian_noise, blur, brightness, contrast, jpeg, haze, occlusion"),
    ("blur", 0, "1 to 5"),
    ("blur", 6, "1 to 5"),
    ("blur", 2.0, "1 to 5"),
    ("blur", True, "1 to 5"),
])
def test_bad_name_or_severity_names_the_valid_values(name, severity, match):
    with pytest.raises(DetpactError, match=match):
        corrupt(scene(), name, severity, seed=0)


def test_bad_seed_or_image_is_refused():
    with pytest.raises(DetpactError, match="non-negative"):
        corrupt(scene(), "blur", 1, seed=-1)
    with pytest.raises(DetpactError, match="uint8"):
        corrupt(scene().astype(np.float32), "blur", 1, seed=0)
    with pytest.raises(DetpactError, match="uint8"):
        corrupt(scene()[..., 0], "blur", 1, seed=0)
