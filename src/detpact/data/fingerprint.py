"""Dataset fingerprint: a hash of relative paths, file sizes and label content.

Cheap enough to compute at every start (no image decoding), yet it changes when an
image is added, removed, replaced by one of another size, or relabelled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from detpact.data.formats import Sample, dataset_relative


def dataset_fingerprint(root: Path, splits: Iterable[tuple[str, list[Sample]]], class_names: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(("\n".join(class_names) + "\0").encode())
    for split, samples in splits:
        digest.update(f"split:{split}\0".encode())
        for sample in samples:
            rel = dataset_relative(sample.image_path, root)
            digest.update(f"{rel}\0{sample.image_path.stat().st_size}\0".encode())
            digest.update(sample.labels.tobytes())
            digest.update(sample.boxes.tobytes())
            if sample.ignore is not None and sample.ignore.any():  # YOLO/synthetic fingerprints unchanged
                digest.update(b"ignore" + sample.ignore.tobytes())
    return digest.hexdigest()
