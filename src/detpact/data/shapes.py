"""Rendering of the synthetic "shapes" scenes: textured backgrounds and occluding shapes.

`render_scene(rng, ...)` draws one image and returns its pixels with exact boxes; the
dataset writer (`synthetic.py`) seeds one generator per image and writes the files.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from detpact.data.domains import NOISE_SIGMA, add_clutter, check_domain, night_shift

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

SIZE_RANGE = (0.08, 0.40)  # longest box side as a fraction of image_size
MIN_OBJECT_PIXELS = 8.0  # ...but never below this: smaller stars and crosses are blobs
MIN_VISIBLE = 0.6  # every object keeps at least this fraction of its pixels visible
MIN_VISIBLE_BOX_IOU = 0.85  # IoU(visible-pixel box, label box): keeps labels inferable
PLACEMENT_TRIES = 10  # after this many rejected placements the object is skipped
MIN_COLOUR_DISTANCE = 100.0  # RGB distance of an object colour from the background under it
SUPERSAMPLE = 4  # shapes are rasterised at 4x and averaged down: anti-aliased edges
# Standard normal quantiles at the centres of 256 equal-probability bins.
_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])


@dataclass
class Scene:
    """One rendered image and its ground truth.

    image:   [S, S, 3] uint8 RGB (before JPEG encoding)
    classes: [N] int64 class ids, in drawing order
    boxes:   [N, 4] float64 (x0, y0, x1, y1) in pixels; pixel i spans [i, i + 1)
    owner:   [S, S] int16, index of the object visible at each pixel, -1 = background
    visible_fraction: [N] float64, share of each object's pixels left unoccluded
    """

    image: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray
    owner: np.ndarray
    visible_fraction: np.ndarray



def render_scene(rng: np.random.Generator, *, image_size: int, max_objects: int, domain: str = "plain") -> Scene:
    """Draw a textured background and 1..max_objects shapes; return pixels and truth.

    Later shapes are drawn over earlier ones, but a placement that would hide more
    than 40% of an earlier shape (or shrink its visible extent) is re-sampled.
    `domain` shifts the imaging condition (data/domains.py); `plain` is the original.
    """
    check_domain(domain)
    size = image_size
    image = _background(rng, size)  # [S, S, 3] float32
    if domain == "cluttered":
        add_clutter(rng, image)
    owner = np.full((size, size), -1, dtype=np.int16)
    classes: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    areas: list[int] = []
    visible: list[int] = []

    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(CLASS_NAMES)))
        for _ in range(PLACEMENT_TRIES):
            verts = _place_shape(rng, cls, size)  # [V, 2] pixel coords
            crop, alpha = _rasterise(verts, size)
            mask = alpha >= 0.5
            area = int(np.count_nonzero(mask))
            if area == 0:
                continue
            hidden = _hidden_counts(owner, crop, mask, len(boxes))
            if _keeps_others_visible(owner, crop, mask, hidden, boxes, areas, visible):
                break
        else:
            continue  # no acceptable placement: skip this object
        new_id = len(boxes)
        for k in np.nonzero(hidden)[0]:
            visible[k] -= int(hidden[k])
        owner[crop][mask] = new_id
        _paint(rng, image, crop, alpha, mask)
        classes.append(cls)
        boxes.append((*verts.min(axis=0).tolist(), *verts.max(axis=0).tolist()))
        areas.append(area)
        visible.append(area)

    pixels = np.clip(image, 0, 255, out=image).astype(np.uint8)
    if domain == "night":
        pixels = night_shift(rng, pixels)
    return Scene(
        image=_add_noise(rng, pixels, NOISE_SIGMA[domain]),
        classes=np.asarray(classes, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        owner=owner,
        visible_fraction=np.asarray(visible, dtype=np.float64) / np.maximum(areas, 1),
    )


def _add_noise(rng: np.random.Generator, image: np.ndarray, sigma_range: tuple[float, float]) -> np.ndarray:
    """Sensor-like gaussian noise (sigma drawn from `sigma_range`), independent per pixel
    and channel, over everything.

    Random bytes go through a 256-entry table of gaussian quantiles and a saturating
    add, both done by PIL on the [S, S*3] byte plane: ~4x cheaper than float normals.
    """
    sigma = rng.uniform(*sigma_range)
    table = np.clip(np.rint(sigma * _NORMAL_QUANTILES) + 128, 0, 255).astype(np.uint8)
    # Whole 64-bit draws viewed as bytes: Generator.bytes() is ~4x slower.
    words = rng.integers(0, 2**64 - 1, size=-(-image.size // 8), dtype=np.uint64, endpoint=True)
    plane = image.reshape(image.shape[0], -1)  # [S, S*3], one byte per channel value
    noise = Image.fromarray(words.view(np.uint8)[: image.size].reshape(plane.shape))
    noisy = ImageChops.add(Image.fromarray(plane), noise.point(table.tolist()), scale=1.0, offset=-128)
    return np.asarray(noisy).reshape(image.shape)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + low-frequency blotches + (sometimes) faint stripes or checks. [S, S, 3]"""
    # Both the gradient and the blotches are smooth, so they are built on a coarse
    # grid and interpolated once: full-resolution work is what limits speed.
    grid = int(rng.integers(3, 9))
    cells = (np.arange(grid) + 0.5) / grid  # [g]
    angle = rng.uniform(0, 2 * math.pi)
    t = np.cos(angle) * cells[None, :] + np.sin(angle) * cells[:, None]  # [g, g]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(20, 235, size=(2, 3))
    coarse = c0 + (c1 - c0) * t[..., None]  # [g, g, 3]
    coarse += (rng.uniform(0, 255, size=(grid, grid, 3)) - 128) * rng.uniform(0.05, 0.3)
    weights = _smooth_weights(size, grid)  # [S, g]
    rows = (weights @ coarse.astype(np.float32).reshape(grid, grid * 3)).reshape(size, grid, 3)
    image = np.matmul(weights[None], rows)  # [S, S, 3]

    pattern = rng.uniform()
    if pattern < 0.5:
        amplitude = rng.uniform(5, 16)
        freq = 2 * math.pi * size / rng.uniform(4, 24)  # radians per image width
        phase = rng.uniform(0, 2 * math.pi)
        a = rng.uniform(0, math.pi)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # [S]
        if pattern < 0.3:  # stripes along direction a
            wave = _plane_wave(coords, freq * math.cos(a), freq * math.sin(a), phase)
        else:  # checks, rotated by a
            wave = np.sign(
                _plane_wave(coords, freq * math.cos(a), freq * math.sin(a), phase)
                * _plane_wave(coords, -freq * math.sin(a), freq * math.cos(a), 0.0)
            )
        image += (np.float32(amplitude) * wave)[..., None]
    return image


@functools.lru_cache(maxsize=16)
def _smooth_weights(size: int, grid: int) -> np.ndarray:
    """Gaussian interpolation weights from `grid` cell centres to `size` pixels. [S, g]

    Applied along both axes this turns a coarse random grid into a smooth field.
    """
    pixels = (np.arange(size) + 0.5) / size
    cells = (np.arange(grid) + 0.5) / grid
    weights = np.exp(-0.5 * ((pixels[:, None] - cells[None, :]) * (grid / 0.7)) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _plane_wave(coords: np.ndarray, fx: float, fy: float, phase: float) -> np.ndarray:
    """sin(fx * x + fy * y + phase) on the grid, from 1-D factors (separable). [S, S]"""
    ax, ay = fx * coords + phase, fy * coords  # [S], [S]
    return np.sin(ay)[:, None] * np.cos(ax)[None, :] + np.cos(ay)[:, None] * np.sin(ax)[None, :]


def _unit_shape(rng: np.random.Generator, cls: int) -> np.ndarray:
    """Vertices of a shape around the origin, roughly unit radius, unrotated. [V, 2]"""
    name = CLASS_NAMES[cls]
    if name == "circle":
        # 64 vertices with one on each axis, so the extent is exactly the radius.
        a = np.arange(64) * (2 * math.pi / 64)
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if name == "triangle":
        # Near-equilateral, with a little jitter so not every triangle is identical.
        a = np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.15, 0.15, size=3)
        r = rng.uniform(0.85, 1.0, size=3)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    if name == "star":
        a = np.arange(10) * (2 * math.pi / 10)
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    if name == "cross":
        w = rng.uniform(0.28, 0.38)  # half-width of an arm
        return np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
             [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]],
            dtype=np.float64,
        )
    raise AssertionError(f"unknown shape {name}")


def _place_shape(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A randomly rotated, scaled and positioned shape, fully inside the image. [V, 2]"""
    verts = _unit_shape(rng, cls)
    if CLASS_NAMES[cls] != "circle":
        a = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        verts = verts @ rot.T
    extent = verts.max(axis=0) - verts.min(axis=0)  # [2]
    low, high = SIZE_RANGE[0] * size, SIZE_RANGE[1] * size
    longest = rng.uniform(min(max(low, MIN_OBJECT_PIXELS), high), high)
    verts = (verts - verts.min(axis=0)) * (longest / extent.max())
    room = size - verts.max(axis=0)  # [2], >= 0 since longest <= 0.4 * size
    return verts + rng.uniform(0, 1, size=2) * room


def _rasterise(verts: np.ndarray, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage of the polygon inside its pixel-aligned bounding crop.

    Returns the crop (row slice, column slice) into the image and alpha [h, w] in [0, 1].
    """
    x0, y0 = np.floor(verts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(verts.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    h, w = y1 - y0, x1 - x0
    s = SUPERSAMPLE
    # PIL floors vertices to whole (sub)pixels and fills spans including both end
    # pixels; measured against exact point sampling, shifting x by half a subpixel
    # and dropping each span's first subpixel removes the bias, leaving an unbiased
    # error under 1/s px. That keeps drawn pixels and box labels in agreement.
    canvas = Image.new("L", (w * s + 1, h * s), 0)  # +1 empty column: offset() wraps
    points = (verts - (x0, y0)) * s - (0.5, 0.0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    canvas = ImageChops.darker(canvas, ImageChops.offset(canvas, 1, 0)).crop((0, 0, w * s, h * s))
    coverage = np.asarray(canvas.reduce(s), dtype=np.float32)  # box average, [h, w]
    return (slice(y0, y1), slice(x0, x1)), coverage * np.float32(1 / 255)


def _hidden_counts(owner: np.ndarray, crop, mask: np.ndarray, n: int) -> np.ndarray:
    """Per existing object, how many of its visible pixels the new mask would cover. [n]"""
    under = owner[crop][mask]
    under = under[under >= 0]
    return np.bincount(under, minlength=n)[:n] if n else np.zeros(0, dtype=np.int64)


def _keeps_others_visible(owner, crop, mask, hidden, boxes, areas, visible) -> bool:
    """True if every object the new mask covers stays >= 60% visible, extent intact."""
    affected = np.nonzero(hidden)[0]
    if affected.size == 0:
        return True
    covered = np.zeros(owner.shape, dtype=bool)
    covered[crop] = mask
    for k in affected:
        if visible[k] - hidden[k] < MIN_VISIBLE * areas[k]:
            return False
        # The label stays the full shape's box, so the visible part must still span
        # most of it: hiding a star's tip entirely would make the box a guess.
        bx0, by0, bx1, by1 = boxes[k]
        region = (slice(int(by0), math.ceil(by1)), slice(int(bx0), math.ceil(bx1)))
        vis = (owner[region] == k) & ~covered[region]
        rows, cols = np.nonzero(vis.any(axis=1))[0], np.nonzero(vis.any(axis=0))[0]
        vis_box = (
            region[1].start + cols[0], region[0].start + rows[0],
            region[1].start + cols[-1] + 1, region[0].start + rows[-1] + 1,
        )
        if _iou(vis_box, boxes[k]) < MIN_VISIBLE_BOX_IOU:
            return False
    return True


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _paint(rng: np.random.Generator, image: np.ndarray, crop, alpha: np.ndarray, mask: np.ndarray) -> None:
    """Blend a random, gently shaded colour into the crop, contrasting with what is under it."""
    region = image[crop]  # view, [h, w, 3]
    h, w = alpha.shape
    under = mask.reshape(-1).astype(np.float32) @ region.reshape(-1, 3) / max(int(mask.sum()), 1)  # [3]
    candidates = rng.uniform(0, 255, size=(12, 3))
    distance = np.linalg.norm(candidates - under, axis=1)
    ok = np.nonzero(distance >= MIN_COLOUR_DISTANCE)[0]
    colour = candidates[ok[0] if ok.size else int(distance.argmax())].astype(np.float32)

    # A soft linear shading across the shape, like uneven light, so it is not flat.
    # Values past 255 are fine here: the image is clipped once, when it becomes bytes.
    gy, gx = rng.uniform(-0.12, 0.12, size=2)
    ys = np.arange(h, dtype=np.float32) * np.float32(2 * gy / max(h - 1, 1)) - np.float32(gy)  # [h]
    xs = np.arange(w, dtype=np.float32) * np.float32(2 * gx / max(w - 1, 1)) - np.float32(gx)  # [w]
    shade = (1.0 + ys[:, None]) + xs[None, :]  # [h, w]
    fill = shade[..., None] * colour  # [h, w, 3]
    fill -= region
    fill *= alpha[..., None]
    region += fill
