"""Deterministic image + box transforms: letterbox resize and horizontal flip.

Every random choice draws from a generator the caller seeds from (seed, epoch,
index), so a sample's pixels do not depend on worker count or load order.
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
    image = image.convert("RGB")  # before resizing: palette and greyscale images resize as colour
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = np.asarray(image)
    return canvas, Letterbox(scale, pad_x, pad_y)


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
