"""On-disk dataset formats read into one record type, `Sample`.

YOLO layout: `<root>/images/<split>/**/*.jpg` with `<root>/labels/<split>/**/*.txt`
mirroring the image paths; each label line is `class cx cy w h`, normalised to [0, 1].
An image without a label file is a background image (no objects).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detpact.errors import DetpactError

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One labelled image. boxes: [N, 4] float32 xyxy in original-image pixels; labels: [N]
    int64; ignore: [N] bool, set for regions to neither train on nor count as misses
    (COCO crowd, VOC difficult), None when there are none."""

    image_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray | None = None


def read_class_names(root: Path, names: list[str] | None) -> list[str]:
    """Class names from the config if given, else `<root>/classes.txt` (one per line)."""
    if names:
        return list(names)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DetpactError(
            f"No class names for dataset {root}: set data.classes in the config "
            f"or write {classes_file} with one class name per line."
        )
    found = [line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not found:
        raise DetpactError(f"{classes_file} is empty: write one class name per line.")
    return found


def read_yolo_split(root: Path, split: str, num_classes: int) -> list[Sample]:
    """Read `<root>/images/<split>` and `<root>/labels/<split>` into Sample records (sorted by path)."""
    image_dir = root / "images" / split
    label_dir = root / "labels" / split
    if not image_dir.is_dir():
        raise DetpactError(
            f"Dataset split folder not found: {image_dir}. A YOLO dataset needs "
            f"images/{split}/ and labels/{split}/ under data.path ({root}); "
            "fix data.path or data.train_split / data.val_split."
        )
    image_paths = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not image_paths:
        raise DetpactError(f"Dataset split {image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    samples = []
    for path in image_paths:
        width, height = image_size(path)
        label_path = (label_dir / path.relative_to(image_dir)).with_suffix(".txt")
        boxes, labels = _read_yolo_labels(label_path, width, height, num_classes)
        samples.append(Sample(path, width, height, boxes, labels))
    return samples


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed, i.e. after its EXIF orientation is applied
    (what labels refer to), from the header alone; DetpactError when unreadable."""
    try:
        with Image.open(path) as im:
            return upright_size(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DetpactError(f"Cannot read image {path}: {exc}. Remove or replace the file.") from None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The size of `image` once its EXIF orientation is applied (orientations 5-8 swap the sides)."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in (5, 6, 7, 8) else (width, height)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, the default when absent or invalid)."""
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully as upright RGB (EXIF orientation applied, as everywhere in
    detpact); a user-facing error names the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DetpactError(f"Cannot read image {path}: {exc}. Remove or replace the file.") from None


def _read_yolo_labels(path: Path, width: int, height: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 5:
                raise ValueError
            cls_value, *coords = (float(p) for p in parts)
        except ValueError:
            raise DetpactError(
                f"{path}:{line_no}: expected 'class cx cy w h' (5 numbers), got {line.strip()!r}."
            ) from None
        cls_id = int(cls_value)
        if cls_id != cls_value or not 0 <= cls_id < num_classes:
            raise DetpactError(
                f"{path}:{line_no}: class id {parts[0]} is not an integer in 0..{num_classes - 1} "
                "(the dataset's class names). Fix the label or data.classes."
            )
        cx, cy, w, h = coords
        if not np.all(np.isfinite(coords)) or w <= 0 or h <= 0:
            raise DetpactError(f"{path}:{line_no}: box must have finite coordinates and w, h > 0.")
        rows.append((cls_id, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height))
    if not rows:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    table = np.asarray(rows, dtype=np.float64)
    boxes = table[:, 1:].clip(0, [width, height, width, height]).astype(np.float32)
    return boxes, table[:, 0].astype(np.int64)
