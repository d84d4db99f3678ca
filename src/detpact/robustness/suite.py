"""Score a detector (or a predictions file) on the scenario suite: clean, every corruption
at every severity, every subset; and the robustness summary.

A corrupted split is the clean split with each image corrupted on the original pixels,
before the letterbox (`CorruptedImages` stands in for the image cache of the evaluation
loader), so the boxes, the letterbox and the scoring are exactly the clean ones. A subset
is scored on the clean detections of the images it selects, whole images (subsets.py).

Summary, as COCO-C (Michaelis et al. 2019): mPC = the mean mAP50-95 over every corruption
row (each corruption at each severity scored), rPC = mPC / clean mAP50-95.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detpact.config import DataConfig, EvalConfig
from detpact.data.dataset import eval_loader
from detpact.data.formats import Sample, dataset_relative, open_rgb
from detpact.data.transforms import resize_long_side
from detpact.engine.evaluate import Backend, predict_loader, score
from detpact.engine.progress import progress_bar
from detpact.evaluation.coco import ImageDetections
from detpact.robustness.corruptions import corrupt, image_seed
from detpact.robustness.settings import ScenarioRow, ScenarioSettings, SubsetScenario, scenario_rows
from detpact.robustness.subsets import crowded, small_objects, truncated, with_classes

# The metrics each row of the report keeps (the full COCO set is in eval reports).
ROW_METRICS = ("map50_95", "map50", "map75")


class CorruptedImages:
    """The evaluation loader's image source with one corruption applied: `load(path, size)`
    decodes the original image, corrupts it with its own seed, image_seed(seed, path
    relative to `root`), and resizes it for the letterbox, as the image cache would."""

    def __init__(self, root: Path, corruption: str, severity: int, seed: int):
        self.root, self.corruption, self.severity, self.seed = Path(root), corruption, severity, seed

    def load(self, path: Path, size: int) -> np.ndarray:
        pixels = np.asarray(open_rgb(path))
        key = dataset_relative(Path(path), self.root)
        corrupted = corrupt(pixels, self.corruption, self.severity, image_seed(self.seed, key))
        return resize_long_side(Image.fromarray(corrupted), size)


def select_subset(subset: SubsetScenario, samples: Sequence[Sample], class_names: Sequence[str]) -> list[int]:
    """The indices of the images `subset`'s rule keeps."""
    params = subset.params()
    if subset.subset == "small_objects":
        return small_objects(samples, params["max_area"])
    if subset.subset == "crowded":
        return crowded(samples, params["min_objects"])
    if subset.subset == "truncated":
        return truncated(samples, params["margin"])
    return with_classes(samples, params["classes"], class_names)


class Scorer:
    """Scores detections of (a selection of) the split's samples into a report row."""

    def __init__(self, samples: list[Sample], class_names: list[str], max_det: int, eval_cfg: EvalConfig):
        self.samples, self.class_names, self.max_det, self.eval_cfg = samples, class_names, max_det, eval_cfg

    def metrics(self, detections: list[ImageDetections], indices: list[int] | None = None) -> dict[str, Any]:
        """mAP of `detections` (image_id = index in samples) on all samples, or on `indices` only."""
        if indices is None:
            samples, selected = self.samples, detections
        else:
            samples = [self.samples[i] for i in indices]
            selected = [ImageDetections(new, detections[old].boxes, detections[old].scores, detections[old].labels)
                        for new, old in enumerate(indices)]
        if not samples:
            return {key: None for key in ROW_METRICS}
        metrics = score(samples, selected, self.class_names, self.max_det, self.eval_cfg)
        return {key: metrics[key] for key in ROW_METRICS}


def run_suite(settings: ScenarioSettings, samples: list[Sample], class_names: list[str], scorer: Scorer,
              clean: list[ImageDetections], predict_corrupted: Callable[[str, int], list[ImageDetections]] | None,
              skip_reason: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The report's scenario part: {"clean", "scenarios", "skipped", "summary"}.

    clean: the detections on the clean split; predict_corrupted(corruption, severity): the
    detections on the corrupted split, None when the source cannot see new images (a
    predictions file), in which case every corruption row is skipped with `skip_reason`.
    """
    clean_row = {"name": "clean", "kind": "clean", "num_images": len(samples), **scorer.metrics(clean)}
    rows, skipped = [], []
    todo = scenario_rows(settings)
    with progress_bar("scenarios", len(todo), enabled=progress) as bar:
        for row in todo:
            if row.kind == "corruption" and predict_corrupted is None:
                skipped.append({"name": row.name, "kind": row.kind, "reason": skip_reason})
            elif row.kind == "corruption":
                rows.append({**_describe(row), "num_images": len(samples),
                             **scorer.metrics(predict_corrupted(row.corruption, row.severity))})
            else:
                indices = select_subset(row.subset, samples, class_names)
                rows.append({**_describe(row), "num_images": len(indices), **scorer.metrics(clean, indices)})
            bar.advance()
    for row in rows:
        row.update({f"drop_{key}": _drop(clean_row[key], row[key]) for key in ("map50_95", "map50")})
    return {"clean": clean_row, "scenarios": rows, "skipped": skipped, "summary": summary(clean_row, rows)}


def corrupted_predictor(backend_for: Callable[[], Backend], samples: list[Sample], data_cfg: DataConfig,
                        batch_size: int, root: Path, seed: int) -> Callable[[str, int], list[ImageDetections]]:
    """predict_corrupted for run_suite: a backend from `backend_for()` over the corrupted split."""
    def predict(corruption: str, severity: int) -> list[ImageDetections]:
        loader = eval_loader(samples, data_cfg, batch_size, cache=CorruptedImages(root, corruption, severity, seed))
        return predict_loader(backend_for(), loader)
    return predict


def summary(clean: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """mPC (mean mAP50-95 over the corruption rows) and rPC = mPC / clean; None without corruption rows."""
    scores = [row["map50_95"] for row in rows if row["kind"] == "corruption"]
    if not scores:
        return None
    mpc = float(np.mean(scores))
    rpc = mpc / clean["map50_95"] if clean["map50_95"] else None
    per_corruption = {}
    for row in rows:
        if row["kind"] == "corruption":
            per_corruption.setdefault(row["corruption"], []).append(row["map50_95"])
    return {"mpc": mpc, "rpc": rpc, "corruption_rows": len(scores),
            "mean_map50_95_per_corruption": {name: float(np.mean(v)) for name, v in per_corruption.items()}}


def _describe(row: ScenarioRow) -> dict[str, Any]:
    if row.kind == "corruption":
        return {"name": row.name, "kind": "corruption", "corruption": row.corruption, "severity": row.severity}
    return {"name": row.name, "kind": "subset", "subset": row.subset.subset, "params": row.subset.params()}


def _drop(clean: float | None, value: float | None) -> float | None:
    """How much lower than clean a scenario scores (positive = worse); None when either is missing."""
    return None if clean is None or value is None else clean - value
