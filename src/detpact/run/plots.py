"""The plots of a run's reports/: training curves, validation mAP, PR curves per class,
a confusion matrix and validation images with predictions and ground truth.

Each `plot_*` takes plain data (metric rows, an evaluation's curves, arrays) and writes
one PNG atomically; it raises NoData when there is nothing to draw yet. Drawing uses
matplotlib's object API on the Agg renderer (`Figure`, never pyplot), so no display or
GUI backend is ever touched. Text taken from the run (class names, file names, metric
keys) goes through `_literal`, so a '$' in it prints as itself rather than as mathtext.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from detpact.data.formats import Sample, open_rgb
from detpact.evaluation.records import ImageDetections
from detpact.run.atomic import atomic_open

DPI = 100
STYLE = {"font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False}
CAPTION_KEY = "detpact:caption"  # the PNG text chunk holding an evaluation plot's caption
VAL_CURVES = (("map50_95", "mAP .50:.95"), ("map50", "mAP .50"), ("map75", "mAP .75"))


class NoData(Exception):
    """Nothing to draw yet (no steps logged, no validation, no detections): the reason."""


@contextmanager
def _figure(path: Path, width: float, height: float, caption: str | None = None) -> Iterator[Figure]:
    """A figure to draw on, saved as PNG to `path` (atomically) when the block ends, with
    `caption` (what an evaluation plot shows) in a CAPTION_KEY text chunk."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        yield figure
        with atomic_open(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=DPI, metadata={CAPTION_KEY: caption} if caption else None)


def caption_of(plot: Path) -> str | None:
    """The caption an evaluation plot was saved with (None for a plot without one), so that
    a report redrawn without evaluating (`detpact test`, `detpact report --no-eval`) still
    says what the plot shows."""
    try:
        with Image.open(plot) as image:
            return getattr(image, "text", {}).get(CAPTION_KEY)
    except (OSError, ValueError):
        return None


def _literal(text: object) -> str:
    """`text` as matplotlib prints it literally (an unescaped '$' would start mathtext)."""
    return str(text).replace("$", r"\$")


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows where `key` is a finite number."""
    pairs = [(r["step"], r[key]) for r in rows
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _smoothed(values: np.ndarray) -> np.ndarray:
    """A running mean over ~2% of the points (at least 1), for noisy per-step curves."""
    window = max(1, len(values) // 50)
    if window == 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    head = sums[1:window] / np.arange(1, window)  # the first points average what there is
    return np.concatenate([head, (sums[window:] - sums[:-window]) / window])


def _step_curve(axes: Any, steps: np.ndarray, values: np.ndarray, label: str, color: Any) -> None:
    if len(values) > 100:  # raw steps faint, their running mean on top
        axes.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        axes.plot(steps, _smoothed(values), color=color, linewidth=1.5, label=label)
    else:
        axes.plot(steps, values, color=color, linewidth=1.5, marker="." if len(values) < 30 else None, label=label)


def plot_losses(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The total training loss and each loss component (loss_*) against the step."""
    steps, total = _series(rows, "loss")
    if not len(total):
        raise NoData("no training step logged")
    components = sorted({k for r in rows for k in r if k.startswith("loss_")})
    with _figure(path, 9.0, 3.4) as figure:
        left, right = figure.subplots(1, 2)
        _step_curve(left, steps, total, "loss", "C0")
        left.set(title="training loss", xlabel="step")
        for i, key in enumerate(components):
            x, y = _series(rows, key)
            if len(y):
                _step_curve(right, x, y, _literal(key), f"C{(i + 1) % 10}")
        right.set(title="loss components", xlabel="step")
        if components and all((_series(rows, k)[1] > 0).all() for k in components):
            right.set_yscale("log")  # components differ by orders of magnitude
        if components:
            right.legend(fontsize=8)
    return path


def plot_lr(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The learning rate of each optimizer step (warm-up and schedule)."""
    steps, lr = _series(rows, "lr")
    if not len(lr):
        raise NoData("no training step logged")
    with _figure(path, 6.0, 3.0) as figure:
        axes = figure.subplots()
        axes.plot(steps, lr, color="C2", linewidth=1.5)
        axes.set(title="learning rate", xlabel="step", ylabel="lr")
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return path


def plot_grad_norm(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The gradient norm of each optimizer step (before clipping), log scale."""
    steps, norms = _series(rows, "grad_norm")
    if not len(norms):
        raise NoData("no gradient norm logged")
    with _figure(path, 6.0, 3.0) as figure:
        axes = figure.subplots()
        _step_curve(axes, steps, norms, "grad norm", "C3")
        axes.set(title="gradient norm", xlabel="step")
        if (norms > 0).all():
            axes.set_yscale("log")
    return path


def plot_val_map(rows: Sequence[Mapping[str, Any]], path: Path, best_step: int | None = None) -> Path:
    """Validation mAP .50:.95, .50 and .75 against the step; `best_step` marked."""
    if not any(len(_series(rows, key)[1]) for key, _ in VAL_CURVES):
        raise NoData("no validation with ground truth recorded")
    with _figure(path, 6.0, 3.2) as figure:
        axes = figure.subplots()
        for i, (key, label) in enumerate(VAL_CURVES):
            steps, values = _series(rows, key)
            axes.plot(steps, values, color=f"C{i}", marker="o", markersize=3, linewidth=1.5, label=label)
        if best_step is not None:
            axes.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"best.pt (step {best_step})")
        axes.set(title="validation mAP", xlabel="step", ylim=(0, 1.02))
        axes.legend(fontsize=8)
    return path


def plot_pr_curves(curves: Mapping[str, Any], path: Path, max_legend: int = 12, caption: str | None = None) -> Path:
    """Each class's precision-recall curve (an evaluation's `pr_curves`), AP50 in the
    legend, and their mean; classes without ground truth are left out."""
    recall = np.asarray(curves["recall"])
    per_class = {name: np.asarray(p) for name, p in curves["precision"].items() if p is not None}
    if not per_class:
        raise NoData("no class has ground truth")
    with _figure(path, 6.4, 4.6, caption) as figure:
        axes = figure.subplots()
        cmap = matplotlib.colormaps["tab20" if len(per_class) > 10 else "tab10"]
        labelled = len(per_class) <= max_legend
        for i, (name, precision) in enumerate(per_class.items()):
            axes.plot(recall, precision, color=cmap(i % cmap.N), linewidth=1.2 if labelled else 0.6,
                      label=f"{_literal(name)} ({precision.mean():.3f})" if labelled else None)
        mean = np.mean(list(per_class.values()), axis=0)
        axes.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes ({mean.mean():.3f})")
        axes.set(title=f"precision-recall at IoU {curves['iou']:.2f} (AP50 per class)", xlabel="recall",
                 ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        axes.legend(fontsize=7, loc="lower left")
    return path


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path,
                   score_threshold: float, iou_threshold: float, caption: str | None = None) -> Path:
    """The confusion matrix (evaluation/confusion.py), each true class's column
    normalised, with the counts written in when there are few classes."""
    matrix = np.asarray(matrix)
    if matrix.sum() == 0:
        raise NoData("no ground truth and no confident detection")
    names = [*map(_literal, class_names), "background"]
    side = min(14.0, max(4.5, 0.45 * len(names) + 2.0))
    with _figure(path, side + 1.0, side, caption) as figure:
        axes = figure.subplots()
        totals = matrix.sum(0, keepdims=True)
        share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
        image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
        ticks = np.arange(len(names))
        small = 7 if len(names) <= 30 else 4
        axes.set_xticks(ticks, names, rotation=90, fontsize=small)
        axes.set_yticks(ticks, names, fontsize=small)
        axes.grid(False)
        axes.set(xlabel="true class", ylabel="predicted class",
                 title=f"confusion matrix (score >= {score_threshold:g}, IoU >= {iou_threshold:g})")
        if len(names) <= 20:
            for (row, col), count in np.ndenumerate(matrix):
                if count:
                    axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                              color="white" if share[row, col] > 0.5 else "black")
    return path


def plot_val_images(samples: Sequence[Sample], detections: Sequence[ImageDetections], class_names: Sequence[str],
                    path: Path, score_threshold: float, count: int = 8, columns: int = 4,
                    caption: str | None = None) -> Path:
    """The first `count` validation images: ground truth dashed white, detections scoring
    at least `score_threshold` in their class's colour with class and score.
    `detections[i]` belongs to `samples[i]` (image_id = index)."""
    count = min(count, len(samples))
    if count == 0:
        raise NoData("the validation split is empty")
    by_id = {d.image_id: d for d in detections}
    columns = min(columns, count)
    rows = -(-count // columns)
    cmap = matplotlib.colormaps["tab10"]
    with _figure(path, 2.6 * columns, 2.6 * rows + 0.3, caption) as figure:
        grid = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
        for axes in grid:
            axes.set_axis_off()
        for i in range(count):
            sample, axes = samples[i], grid[i]
            axes.imshow(np.asarray(open_rgb(sample.image_path)))
            for x1, y1, x2, y2 in np.asarray(sample.boxes).reshape(-1, 4):
                axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                                         linestyle="--", linewidth=1.0))
            det = by_id.get(i)
            shown = 0
            if det is not None:
                for box, det_score, label in zip(det.boxes, det.scores, det.labels):
                    if det_score < score_threshold:
                        continue
                    shown += 1
                    color = cmap(int(label) % cmap.N)
                    x1, y1, x2, y2 = box
                    axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.4))
                    name = class_names[label] if 0 <= label < len(class_names) else label
                    axes.text(x1, y1, f"{_literal(name)} {det_score:.2f}", fontsize=6, color="white", va="bottom",
                              bbox={"facecolor": color, "edgecolor": "none", "pad": 0.5, "alpha": 0.85})
            axes.set_title(f"{_literal(sample.image_path.name)}: {len(sample.boxes)} GT, {shown} detected", fontsize=7)
        figure.suptitle(f"validation images: ground truth dashed, detections scoring >= {score_threshold:g}",
                        fontsize=9)
    return path
