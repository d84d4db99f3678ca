"""Deterministic image + box primitives: letterbox resize, horizontal flip, the per-sample RNG.

The letterbox is split in two steps, `resize_long_side` (what the decoded-image cache
stores) and `pad_to_canvas`, so that cached and uncached pixels are the same bytes.
Every random choice draws from `sample_rng(seed, epoch, index)`, so a sample's pixels
do not depend on worker count or load order (the training pipeline is augment.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Grey padding value used by the YOLO family; the exported model's metadata names it.
PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed on the square canvas: canvas = image * scale + (pad_x, pad_y)."""

    scale: float
    pad_x: int
    pad_y: int

    def to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Map xyxy boxes from canvas pixels back to original-image pixels (clipped)."""
        out = (boxes - np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float32)) / self.scale
        return out.clip(0, [width, height, width, height]).astype(np.float32)


def letterbox(image: Image.Image, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio so the longer side is `size`, pad to size x size.

    Returns the canvas as uint8 [size, size, 3] and the placement.
    """
    width, height = image.size
    placement = letterbox_placement(width, height, size)
    return pad_to_canvas(resize_long_side(image, size), placement, size), placement


def letterbox_placement(width: int, height: int, size: int) -> Letterbox:
    """Where `letterbox` puts an image of width x height on the size x size canvas."""
    new_w, new_h = resized_shape(width, height, size)
    return Letterbox(size / max(width, height), (size - new_w) // 2, (size - new_h) // 2)


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image resized so that its longer side is `size`."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_long_side(image: Image.Image, size: int) -> np.ndarray:
    """The image as uint8 [h, w, 3], resized (bilinear) so that its longer side is `size`."""
    if image.mode != "RGB":  # before resizing: palette and greyscale images resize as colour
        image = image.convert("RGB")  # (converting an RGB image would only copy it)
    new_w, new_h = resized_shape(*image.size, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(image)


def pad_to_canvas(pixels: np.ndarray, placement: Letterbox, size: int) -> np.ndarray:
    """Paste resized pixels [h, w, 3] onto a PAD_VALUE canvas [size, size, 3] at the placement's pad."""
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    height, width = pixels.shape[:2]
    canvas[placement.pad_y : placement.pad_y + height, placement.pad_x : placement.pad_x + width] = pixels
    return canvas


def letterbox_boxes(boxes: np.ndarray, placement: Letterbox) -> np.ndarray:
    """Map xyxy boxes from original-image pixels onto the canvas."""
    offset = np.array([placement.pad_x, placement.pad_y] * 2, np.float32)
    return (boxes * placement.scale + offset).astype(np.float32)


def hflip(canvas: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the canvas [H, W, 3] and its xyxy boxes left-right."""
    width = canvas.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return np.ascontiguousarray(canvas[:, ::-1]), flipped


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind every random transform of sample `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index])
