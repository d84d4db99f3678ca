"""`detpact data show`: a grid of training samples as the model sees them, boxes and class names drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detpact.data.dataset import DetectionDataset

GAP = 4  # pixels of white between tiles
# Distinct, readable box colours, cycled by class id.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def save_grid(dataset: DetectionDataset, class_names: list[str], out_path: Path, count: int = 16,
              epoch: int = 0, columns: int = 4) -> Path:
    """Draw samples 0..count-1 of `epoch` (augmented when the dataset trains) into one PNG.

    The tiles are the dataset's S x S canvases, `columns` to a row with GAP pixels
    between them, so the image is (c * S + (c - 1) * GAP) wide for c = min(columns,
    count) and as high for its rows. Returns `out_path`.
    """
    count = min(count, len(dataset))
    if count <= 0:
        raise ValueError("nothing to draw: the dataset is empty or count < 1")
    columns = min(columns, count)
    rows = -(-count // columns)
    size = dataset.image_size
    grid = Image.new("RGB", (columns * size + (columns - 1) * GAP, rows * size + (rows - 1) * GAP), "white")
    for i in range(count):
        image, target = dataset[(epoch, i)]
        tile = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        _draw_boxes(tile, target["boxes"].tolist(), target["labels"].tolist(), class_names)
        grid.paste(tile, ((i % columns) * (size + GAP), (i // columns) * (size + GAP)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path, format="PNG")
    return out_path


def _draw_boxes(tile: Image.Image, boxes: list[list[float]], labels: list[int], class_names: list[str]) -> None:
    draw = ImageDraw.Draw(tile)
    for (x1, y1, x2, y2), label in zip(boxes, labels):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=2 if tile.width >= 256 else 1)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        left, top, right, bottom = draw.textbbox((x1, y1), name)
        top_y = y1 - (bottom - top) - 2 if y1 >= bottom - top + 2 else y1  # above the box if there is room
        draw.rectangle((x1, top_y, x1 + right - left + 2, top_y + bottom - top + 2), fill=colour)
        draw.text((x1 + 1, top_y + 1 - (top - y1)), name, fill=(0, 0, 0))
