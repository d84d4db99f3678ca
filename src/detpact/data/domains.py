"""Domains of the synthetic shapes dataset (`data.synthetic.domain`): the same objects
under a shifted imaging condition, so that a detector trained on one domain meets a real
domain shift on another (the continual benchmark, bench/continual.py).

- `plain`: the scenes of `shapes.render_scene` as they always were (nothing here runs).
- `cluttered`: the background is strewn with unlabelled distractors before the objects
  are drawn: thin bars, elongated ellipses, rings and dots in saturated colours, some of
  them as large as the objects. The objects stay whole and labelled exactly as in
  `plain` (they are drawn over the clutter, never under it).
- `night`: a dim, low-contrast, blue-cast image with heavy sensor noise: the finished
  scene's intensities are scaled by 0.3-0.5 with per-channel gains (red lowest), lifted
  by a small black level, and the noise sigma is 10-18 instead of 2-9.

Every random choice comes from the scene's own generator, drawn only in the shifted
domains, so `plain` images are byte-identical to those of a generator without domains.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

DOMAINS: tuple[str, ...] = ("plain", "cluttered", "night")

CLUTTER_COUNT = (6, 14)  # distractors per image, inclusive range
CLUTTER_SIZE = (0.06, 0.35)  # longest side of a distractor as a fraction of image_size
NIGHT_GAIN = (0.3, 0.5)  # overall intensity scale
NIGHT_CHANNEL_GAIN = np.array([0.7, 0.85, 1.15], dtype=np.float32)  # R, G, B: a blue cast
NIGHT_BLACK_LEVEL = (4.0, 14.0)
NOISE_SIGMA = {"plain": (2.0, 9.0), "cluttered": (2.0, 9.0), "night": (10.0, 18.0)}


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; one of {', '.join(DOMAINS)}")


def add_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """Draw unlabelled distractors onto the float background `image` [S, S, 3], in place."""
    size = image.shape[0]
    canvas = Image.new("RGB", (size, size))
    mask = Image.new("L", (size, size), 0)
    paint, stencil = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(CLUTTER_COUNT[0], CLUTTER_COUNT[1] + 1))):
        kind = int(rng.integers(4))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        length = rng.uniform(*CLUTTER_SIZE) * size
        cx, cy = rng.uniform(0, size, size=2)
        if kind == 0:  # a thin bar
            a = rng.uniform(0, math.pi)
            dx, dy = 0.5 * length * math.cos(a), 0.5 * length * math.sin(a)
            width = max(1, int(rng.uniform(0.01, 0.03) * size))
            for draw, fill in ((paint, colour), (stencil, 255)):
                draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=width)
        elif kind == 1:  # an elongated ellipse (aspect 3-6, never circle-like)
            half_w, half_h = 0.5 * length, 0.5 * length / rng.uniform(3.0, 6.0)
            if rng.uniform() < 0.5:
                half_w, half_h = half_h, half_w
            box = [cx - half_w, cy - half_h, cx + half_w, cy + half_h]
            for draw, fill in ((paint, colour), (stencil, 255)):
                draw.ellipse(box, fill=fill)
        elif kind == 2:  # a ring: an outline, not a filled circle
            r = 0.5 * length
            width = max(1, int(rng.uniform(0.08, 0.15) * r))
            box = [cx - r, cy - r, cx + r, cy + r]
            for draw, fill in ((paint, colour), (stencil, 255)):
                draw.ellipse(box, outline=fill, width=width)
        else:  # a scatter of small dots
            for _ in range(int(rng.integers(3, 9))):
                x, y = rng.uniform(0, size, size=2)
                r = max(0.8, rng.uniform(0.005, 0.015) * size)
                for draw, fill in ((paint, colour), (stencil, 255)):
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] * np.float32(1 / 255)  # [S, S, 1]
    image += (np.asarray(canvas, dtype=np.float32) - image) * alpha


def night_shift(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The finished uint8 scene [S, S, 3] as a dim, blue-cast night image (before noise)."""
    gain = np.float32(rng.uniform(*NIGHT_GAIN)) * NIGHT_CHANNEL_GAIN  # [3]
    black = np.float32(rng.uniform(*NIGHT_BLACK_LEVEL))
    shifted = image.astype(np.float32) * gain + black
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)
