"""Hold out a validation split: `val_ratio` + seed, optionally stratified by box count,
recorded in a split manifest that later runs reuse.

The split is a pure function of (image paths, ratio, seed, stratify); the manifest makes
it survive changes to any of those (new images added to the folder, another detpact
version) and lets a user inspect or hand-edit it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detpact.data.formats import Sample, dataset_relative
from detpact.errors import DetpactError
from detpact.run.atomic import atomic_write_json, read_json

MANIFEST_VERSION = 1


def box_bucket(sample: Sample) -> int:
    """Stratification bucket: 0, 1 or 2+ boxes (ignore regions not counted)."""
    count = len(sample.labels) - (int(sample.ignore.sum()) if sample.ignore is not None else 0)
    return min(count, 2)


def split_by_ratio(samples: list[Sample], ratio: float, seed: int, stratify: bool) -> tuple[list[int], list[int]]:
    """(train indices, val indices), both ascending. round(ratio * n) images go to val
    (at least one to each side); stratified, each box-count bucket gives its share
    (largest remainders get the rounding), drawn at random within the bucket."""
    if len(samples) < 2:
        raise DetpactError(f"data.val_ratio needs at least 2 images to split, the training source has {len(samples)}.")
    rng = np.random.default_rng([seed, 0x5B1D])
    groups = [[i for i, s in enumerate(samples) if box_bucket(s) == b] for b in range(3)] if stratify \
        else [list(range(len(samples)))]
    target = min(max(int(ratio * len(samples) + 0.5), 1), len(samples) - 1)
    shares = [ratio * len(group) for group in groups]
    quotas = [int(share) for share in shares]
    by_remainder = sorted(range(len(groups)), key=lambda g: (-(shares[g] - quotas[g]), g))
    for g in by_remainder[: target - sum(quotas)]:
        quotas[g] += 1
    val: list[int] = []
    for group, quota in zip(groups, quotas):
        order = rng.permutation(len(group))
        val += [group[j] for j in order[:quota]]
    chosen = set(val)
    return [i for i in range(len(samples)) if i not in chosen], sorted(val)


def resolve_split(samples: list[Sample], root: Path, ratio: float, seed: int, stratify: bool,
                  manifest: Path | None) -> tuple[list[int], list[int], dict]:
    """The split of `samples`, read from `manifest` when it exists (written there on first
    use otherwise). Returns (train indices, val indices, a description for run_meta)."""
    names = [dataset_relative(s.image_path, root) for s in samples]
    settings = {"val_ratio": ratio, "split_seed": seed, "stratify": stratify}
    if manifest is not None and manifest.exists():
        train, val = _read_manifest(manifest, names, settings)
        source = "manifest"
    else:
        train, val = split_by_ratio(samples, ratio, seed, stratify)
        source = "computed"
        if manifest is not None:
            manifest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(manifest, {"version": MANIFEST_VERSION, **settings,
                                         "train": [names[i] for i in train], "val": [names[i] for i in val]})
            source = "written"
    info = {**settings, "source": source, "manifest": str(manifest) if manifest else None,
            "num_train": len(train), "num_val": len(val)}
    return train, val, info


def _read_manifest(path: Path, names: list[str], settings: dict) -> tuple[list[int], list[int]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("train"), list) or not isinstance(data.get("val"), list):
        raise DetpactError(f"Split manifest {path} is not a detpact split manifest (JSON with 'train' and 'val' "
                           "lists). Delete it to split again, or fix data.split_manifest.")
    recorded = {key: data.get(key) for key in settings}
    if recorded != settings:
        raise DetpactError(f"Split manifest {path} was written with {recorded}, but the config asks for {settings}. "
                           "Set the config to match, or delete the manifest to split again.")
    index = {name: i for i, name in enumerate(names)}
    listed = [*data["train"], *data["val"]]
    unknown = [n for n in listed if n not in index]
    unlisted = sorted(set(names) - set(listed))
    if unknown or unlisted or len(set(listed)) != len(listed):
        detail = "; ".join(part for part in (
            f"{len(unknown)} listed images are not in the dataset (e.g. {unknown[0]})" if unknown else "",
            f"{len(unlisted)} dataset images are not listed (e.g. {unlisted[0]})" if unlisted else "",
            "an image is listed twice" if len(set(listed)) != len(listed) else "") if part)
        raise DetpactError(f"Split manifest {path} does not match the dataset: {detail}. Restore the data, or "
                           "delete the manifest to split again (the new split will differ).")
    return sorted(index[n] for n in data["train"]), sorted(index[n] for n in data["val"])
