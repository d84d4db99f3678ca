"""On-disk dataset formats read into one record type, `Sample`, plus `Finding`s.

A reader never stops at the first defect and never drops one silently: each
malformed, out-of-range or duplicate label becomes a `Finding` (kind, file, place,
message) and is left out of the samples, so that preflight can report all of them at
once and `data.on_error` can decide. Only a file that cannot be read as the format at
all raises `DetpactError`. COCO JSON and Pascal VOC XML are in `coco_voc.py`.

YOLO layout: an image folder (or a .txt list of images) and a label folder mirroring
it, one `<stem>.txt` per image; each label line is `class cx cy w h`, normalised to
[0, 1] of the upright (EXIF-applied) image. An image without a label file is a
background image; a label file without an image is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detpact.errors import DetpactError

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# Finding kinds. Errors stop training under `data.on_error: fail` (under `skip`, the
# image concerned is dropped); warnings are fixed as described and reported.
ERROR_KINDS = frozenset({
    "bad_line",            # a label line that is not `class cx cy w h`
    "bad_box",             # zero-area, inverted, NaN, or entirely outside the image
    "box_outside_image",   # reaches outside the image beyond the tolerance
    "unknown_class",       # class id out of range, or a name not among the classes
    "unknown_image",       # a COCO annotation of an image id not in `images`
    "duplicate_image",     # a COCO image id listed twice
    "label_without_image", # a label file with no image
    "missing_image",       # an annotated image file that does not exist
    "unreadable_image",    # not an image, empty, truncated or corrupt
    "size_mismatch",       # annotation width/height differ from the (upright) image
})
WARNING_KINDS = frozenset({
    "duplicate_box",        # an exact repeat: deduplicated
    "image_without_label",  # no label file: trained on as a background image
})


@dataclass(frozen=True)
class Finding:
    """One defect in a dataset file. `where` locates it inside the file (a line, an
    annotation id, an object index), None when the whole file is concerned; `image` is
    the image whose sample it affects (what `on_error: skip` drops), if any."""

    kind: str
    path: Path
    where: str | None
    message: str
    image: Path | None = None

    @property
    def severity(self) -> str:
        return "error" if self.kind in ERROR_KINDS else "warning"

    def __str__(self) -> str:
        return f"{self.path}{f' ({self.where})' if self.where else ''}: {self.message}"


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


def dataset_relative(path: Path, root: Path) -> str:
    """How records name an image: its path relative to the dataset root (so a moved
    dataset keeps its fingerprint and split manifest), absolute when listed from outside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()


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


@dataclass
class Annotations:
    """What a reader found: class names in class-id order, the samples, and the defects."""

    class_names: list[str]
    samples: list[Sample] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


# A normalised YOLO coordinate may exceed [0, 1] by this much (rounding) before the box
# counts as outside the image; it is clipped either way.
YOLO_TOLERANCE = 0.01


def list_images(source: Path) -> list[Path]:
    """The images of a folder (recursively, sorted) or of a .txt file listing one path per
    line (relative to the file's folder)."""
    if source.is_file() and source.suffix == ".txt":
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        return [(source.parent / line).resolve() for line in lines if line and not line.startswith("#")]
    if not source.is_dir():
        raise DetpactError(f"Image folder not found: {source}. Fix the images path of the split in the config "
                           "(data.train / data.val, relative to data.path) or the dataset YAML.")
    return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def yolo_label_dir(image_dir: Path) -> Path:
    """The Ultralytics convention: the image path with its last `images` component
    replaced by `labels` (`data/images/train` -> `data/labels/train`)."""
    parts = list(image_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DetpactError(f"Cannot tell where the labels of {image_dir} are: its path has no 'images' folder to "
                       "swap for 'labels'. Set the split's `labels:` folder in the config.")


def read_yolo(images: Path, labels: Path, class_names: list[str]) -> Annotations:
    """Read a YOLO split: the images of `images` (a folder or a .txt list) and their label
    files under `labels`, at the same relative path (for a .txt list: each image's own
    `images` -> `labels` path). Label files with no image are findings too."""
    image_paths = list_images(images)
    from_folder = images.is_dir()  # else a .txt list: each image's own images -> labels path
    result = Annotations(list(class_names))
    label_paths = set()
    for path in image_paths:
        label_path = (labels / path.relative_to(images) if from_folder else yolo_label_dir(path.parent) / path.name
                      ).with_suffix(".txt")
        label_paths.add(label_path)
        try:
            width, height = image_size(path)
        except DetpactError as exc:
            result.findings.append(Finding("unreadable_image", path, None, exc.message, image=path))
            continue
        if not label_path.is_file():
            result.findings.append(Finding("image_without_label", path, None,
                                           f"no label file {label_path.name}: trained on as a background image",
                                           image=path))
            rows = []
        else:
            rows = _read_yolo_labels(label_path, width, height, len(class_names), path, result.findings)
        result.samples.append(sample_from_rows(path, width, height, rows))
    if from_folder and labels.is_dir():  # (an image list may share its label folder with other lists)
        for orphan in sorted(set(labels.rglob("*.txt")) - label_paths):
            if orphan.name != "classes.txt":
                result.findings.append(Finding("label_without_image", orphan, None,
                                               "a label file with no image of the same name: its boxes are unused"))
    return result


def read_yolo_split(root: Path, split: str, class_names: list[str]) -> list[Sample]:
    """The samples of `<root>/images/<split>` with labels from `<root>/labels/<split>`,
    failing on the first error finding (a convenience for tests and scripts)."""
    result = read_yolo(root / "images" / split, root / "labels" / split, class_names)
    errors = [f for f in result.findings if f.severity == "error"]
    if errors:
        raise DetpactError(f"{errors[0]}. Run `detpact data preflight` for the full report.")
    return result.samples


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


def _read_yolo_labels(path: Path, width: int, height: int, num_classes: int, image: Path,
                      findings: list[Finding]) -> list[tuple]:
    """Rows (x1, y1, x2, y2, class, ignore) in pixels; each bad line is a finding."""
    rows: list[tuple] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {line_no}"
        parts = line.split()
        try:
            if len(parts) != 5:
                raise ValueError
            cls_value, cx, cy, w, h = (float(p) for p in parts)
        except ValueError:
            findings.append(Finding("bad_line", path, where, f"expected 'class cx cy w h' (5 numbers), got "
                                                              f"{line.strip()[:80]!r}", image=image))
            continue
        if not (cls_value.is_integer() and 0 <= cls_value < num_classes):
            findings.append(Finding("unknown_class", path, where, f"class id {parts[0]} is not an integer in "
                                    f"0..{num_classes - 1} (the dataset's classes); fix the label or the class "
                                    "names", image=image))
            continue
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if not all(math.isfinite(v) for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            findings.append(Finding("bad_box", path, where, f"box {parts[1:]} needs finite coordinates and "
                                                             "w, h > 0", image=image))
            continue
        lo, hi = -YOLO_TOLERANCE, 1 + YOLO_TOLERANCE
        if x2 <= 0 or y2 <= 0 or x1 >= 1 or y1 >= 1:
            findings.append(Finding("bad_box", path, where, f"box {parts[1:]} lies outside the image", image=image))
            continue
        if min(x1, y1) < lo or max(x2, y2) > hi:
            findings.append(Finding("box_outside_image", path, where, f"box {parts[1:]} reaches outside the image "
                                    f"(corners {x1:.3f},{y1:.3f} .. {x2:.3f},{y2:.3f}, allowed {lo}..{hi}); "
                                    "clipped", image=image))
        row = (max(x1, 0.0) * width, max(y1, 0.0) * height, min(x2, 1.0) * width, min(y2, 1.0) * height,
               int(cls_value), False)
        if row in rows:
            findings.append(_duplicate(row, path, where, image))
            continue
        rows.append(row)
    return rows


def dedup_rows(rows: list[tuple], path: Path, where: str | None, image: Path | None,
               findings: list[Finding]) -> list[tuple]:
    """Rows without exact repeats (same box, class and ignore flag); each repeat is a finding."""
    kept, seen = [], set()
    for row in rows:
        if row in seen:
            findings.append(_duplicate(row, path, where, image))
            continue
        seen.add(row)
        kept.append(row)
    return kept


def _duplicate(row: tuple, path: Path, where: str | None, image: Path | None) -> Finding:
    return Finding("duplicate_box", path, where, f"box {[round(v, 2) for v in row[:4]]} class {row[4]} appears "
                   "twice; the copy is dropped", image=image)


def sample_from_rows(path: Path, width: int, height: int, rows: list[tuple]) -> Sample:
    """A Sample from rows (x1, y1, x2, y2, class, ignore); `ignore` is None when nothing is ignored."""
    table = np.asarray([row[:5] for row in rows], dtype=np.float64).reshape(-1, 5)
    ignore = np.asarray([row[5] for row in rows], dtype=bool)
    return Sample(path, width, height, table[:, :4].astype(np.float32), table[:, 4].astype(np.int64),
                  ignore if ignore.any() else None)
