"""Preflight: check every image and label of a dataset before training, report all defects.

The readers (formats.py, coco_voc.py) already turn every label defect into a `Finding`;
preflight adds what needs the image files themselves: decoding each one fully
(missing, empty, truncated or corrupt files), its EXIF orientation, and whether the
size an annotation states matches the upright image. Nothing is ever written to the
dataset (truncated images are reported, never "restored").

Decoding is the slow part, so its results are cached per image list, keyed by each
file's path, size and modification time: a second preflight of unchanged data only
reads the cache.
"""

from __future__ import annotations

import difflib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from detpact.data.formats import Annotations, Finding, dataset_relative, exif_orientation, upright_size
from detpact.engine.progress import progress_bar
from detpact.run.atomic import atomic_write_json, read_json

CACHE_VERSION = 1
RARE_BOXES = 3  # a class with at most this many boxes ...
RARE_RATIO = 20  # ... while another has at least 20x as many is reported (rare_class)


@dataclass
class SplitStats:
    images: int = 0
    boxes: int = 0
    ignored_boxes: int = 0
    backgrounds: int = 0  # images with no box: trained on as negatives
    exif_rotated: int = 0  # images shown upright by applying their EXIF orientation


@dataclass
class PreflightReport:
    """Every finding of a dataset, sorted, with counts per split and per kind."""

    root: Path
    format: str
    class_names: list[str]
    splits: dict[str, SplitStats] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def counts(self) -> dict[str, Any]:
        return {"errors": len(self.errors), "warnings": len(self.warnings),
                "by_kind": dict(sorted(Counter(f.kind for f in self.findings).items()))}

    def to_json(self) -> dict[str, Any]:
        """Plain data; identical for identical data (no times, paths relative to the root)."""
        return {
            "root": str(self.root), "format": self.format, "ok": not self.errors, "counts": self.counts(),
            "class_names": self.class_names,
            "splits": {name: vars(stats) for name, stats in self.splits.items()},
            "findings": [{"severity": f.severity, "kind": f.kind, "file": self.relative(f.path), "where": f.where,
                          "message": f.message, "image": self.relative(f.image) if f.image else None}
                         for f in self.findings],
        }

    def relative(self, path: Path) -> str:
        return dataset_relative(path.resolve(), self.root.resolve())

    def summary(self) -> str:
        counts = self.counts()
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts["by_kind"].items())
        return f"{counts['errors']} errors, {counts['warnings']} warnings" + (f" ({kinds})" if kinds else "")


def run_preflight(root: Path, fmt: str, splits: dict[str, Annotations], cache_dir: Path | None = None,
              progress: bool = True) -> PreflightReport:
    """Check the images of every split's samples; the readers' findings are included.

    cache_dir: where decode results are cached (None: no cache).
    """
    names = next(iter(splits.values())).class_names if splits else []
    report = PreflightReport(Path(root), fmt, list(names))
    paths = sorted({sample.image_path for split_read in splits.values() for sample in split_read.samples})
    checks = _check_images(paths, cache_dir, progress)
    for split, split_read in splits.items():
        stats = report.splits[split] = SplitStats()
        report.findings += split_read.findings
        for sample in split_read.samples:
            check = checks[str(sample.image_path.resolve())]
            stats.images += 1
            ignored = int(sample.ignore.sum()) if sample.ignore is not None else 0
            stats.boxes += len(sample.labels) - ignored
            stats.ignored_boxes += ignored
            stats.backgrounds += len(sample.labels) == ignored
            stats.exif_rotated += check.get("orientation", 1) != 1
            report.findings += _image_findings(sample.image_path, (sample.width, sample.height), check)
    report.findings += rare_class_findings(Path(root), splits)
    report.findings = sorted(set(report.findings), key=lambda f: (f.severity != "error", f.kind, str(f.path),
                                                                  _natural(f.where), f.message))
    return report


def rare_class_findings(root: Path, splits: dict[str, Annotations]) -> list[Finding]:
    """A warning for each class seen in very few boxes (at most RARE_BOXES) whose name is
    close to that of a class with at least RARE_RATIO times as many: a typo in a label
    name, such as `racoon` next to `raccoon`, which would otherwise train as a class of
    its own."""
    counts = Counter(int(label) for a in splits.values() for s in a.samples for label in s.labels.tolist())
    names = next(iter(splits.values())).class_names if splits else []
    findings = []
    for class_id, name in enumerate(names):
        seen = counts.get(class_id, 0)
        if seen == 0 or seen > RARE_BOXES:
            continue
        others = [n for i, n in enumerate(names) if i != class_id and counts.get(i, 0) >= RARE_RATIO * seen]
        close = difflib.get_close_matches(name, others, n=1, cutoff=0.75)
        if not close:  # a rare class with a name of its own is just rare (coco128 has several)
            continue
        findings.append(Finding("rare_class", root, f"class {name!r}",
                                f"class {name!r} has only {seen} box{'es' if seen > 1 else ''}, while {close[0]!r} has "
                                f"{counts[names.index(close[0])]}: a typo in a label? Did you mean {close[0]!r}?"))
    return findings


def _image_findings(path: Path, stated: tuple[int, int], check: dict[str, Any]) -> list[Finding]:
    if check.get("missing"):
        return [Finding("missing_image", path, None, f"the annotated image file does not exist (looked for in "
                        f"{path.parent})", image=path)]
    if check.get("error"):
        return [Finding("unreadable_image", path, None, f"cannot be decoded ({check['error']}): empty, truncated "
                        "or corrupt; replace or remove the file", image=path)]
    size = tuple(check["size"])
    if size != stated:
        rotated = check["orientation"] != 1
        hint = (f"; the file's EXIF orientation {check['orientation']} turns it, so the annotation was likely "
                "made on the unrotated frame") if rotated and size[::-1] == stated else ""
        return [Finding("size_mismatch", path, None, f"the annotation says {stated[0]}x{stated[1]} but the upright "
                        f"image is {size[0]}x{size[1]}{hint}; fix the annotation", image=path)]
    return []


def list_findings(findings: list[Finding], limit: int = 20) -> str:
    """One `  - [kind] file (where): message` line per finding, at most `limit`, then how many more."""
    lines = [f"  - [{f.kind}] {f}" for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more")
    return "\n".join(lines)


def check_image(path: Path) -> dict[str, Any]:
    """Decode `path` fully: {"missing": True} | {"error": reason} | {"size": [w, h] upright, "orientation": n}.
    PIL's LOAD_TRUNCATED_IMAGES stays off, so a truncated file is an error."""
    if not path.is_file():
        return {"missing": True}
    try:
        with Image.open(path) as image:
            orientation, size = exif_orientation(image), upright_size(image)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        return {"error": str(exc) or type(exc).__name__}
    return {"size": list(size), "orientation": orientation}


def _check_images(paths: list[Path], cache_dir: Path | None, progress: bool) -> dict[str, dict[str, Any]]:
    """check_image for each path, from the cache when the file list, sizes and times are unchanged."""
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
            stamps.append(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}")
        except OSError:
            stamps.append(f"{path}\0missing")
    key = hashlib.sha256(f"v{CACHE_VERSION}\n".encode() + "\n".join(stamps).encode()).hexdigest()
    cache_file = cache_dir / "preflight" / f"{key[:32]}.json" if cache_dir else None
    cached = read_json(cache_file) if cache_file and cache_file.is_file() else None
    if cached is not None:
        return cached
    results = {}
    with progress_bar("preflight: decoding images", total=len(paths), enabled=progress and len(paths) > 100) as bar:
        for path in paths:
            results[str(path.resolve())] = check_image(path)
            bar.advance()
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file, results)
    return results


def _natural(where: str | None) -> tuple:
    """Sort key putting "line 10" after "line 9"."""
    if where is None:
        return ()
    return tuple(int(part) if part.isdigit() else part for part in where.split())
