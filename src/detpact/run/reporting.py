"""Writing a run's plots and report.html: after training, after `detpact eval`, and by
`detpact report`.

The training curves come from the metric logs on disk; the PR curves, the confusion
matrix and the image grid from an evaluation of the run's validation split (a
`ValEvaluation`, which the caller computes with the one evaluator everything shares).
Reports are a view of a run, never part of its result: a plot that cannot be drawn is a
logged warning and the rest still gets written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detpact.config import EvalConfig
from detpact.data.formats import Sample
from detpact.engine.evaluate import ground_truth
from detpact.evaluation.confusion import confusion_matrix
from detpact.evaluation.records import ImageDetections
from detpact.run.atomic import read_json
from detpact.run.contract import RunDir, write_manifest
from detpact.run.html import write_report_html
from detpact.run.metrics import read_jsonl

log = logging.getLogger(__name__)

EVALUATION_PLOTS = ("pr_curves", "confusion", "val_images")


@dataclass
class ValEvaluation:
    """Detections of one model on (a part of) the run's validation split, scored.

    `detections[i]` belongs to `samples[i]` (image_id = index); `pr_curves` is the
    `pr_curves` of engine.evaluate.score(..., curves=True) on them."""

    source: str  # what was evaluated, for the captions: "best.pt at step 120 (48 images)"
    samples: list[Sample]
    detections: list[ImageDetections]
    pr_curves: dict[str, Any]
    class_names: list[str]
    eval_cfg: EvalConfig


@dataclass
class ReportOutcome:
    """What `write_reports` produced: the plots drawn, and a note per plot not drawn."""

    html: Path | None
    drawn: list[str]
    skipped: dict[str, str]  # plot name -> why (nothing to draw yet, or the error)
    failed: list[str]  # the plots (or "report.html") whose drawing raised


def write_reports(run: RunDir, evaluation: ValEvaluation | None, missing_evaluation: str | None = None
                  ) -> ReportOutcome:
    """Draw the plots into reports/, then report.html, and record them in the manifest.

    Without `evaluation` the evaluation plots on disk are kept as they are (with
    `missing_evaluation` as their note, when there are none). Never raises for a plot.
    """
    from detpact.run import plots  # matplotlib: imported when a report is drawn, not by every command

    outcome = ReportOutcome(None, [], {}, [])
    train_rows, val_rows = read_jsonl(run.train_metrics), read_jsonl(run.val_metrics)
    best_step = ((read_json(run.train_report_json) or {}).get("best") or {}).get("step")
    drawings: dict[str, Callable[[Path], Path]] = {
        "loss": lambda path: plots.plot_losses(train_rows, path),
        "lr": lambda path: plots.plot_lr(train_rows, path),
        "grad_norm": lambda path: plots.plot_grad_norm(train_rows, path),
        "val_map": lambda path: plots.plot_val_map(val_rows, path, best_step),
    }
    notes: dict[str, str] = {}
    if evaluation is not None:
        drawings.update(_evaluation_drawings(evaluation))
        notes.update(dict.fromkeys(EVALUATION_PLOTS, evaluation.source))
    else:
        for name in EVALUATION_PLOTS:
            if not run.plot(name).is_file():
                outcome.skipped[name] = missing_evaluation or "no evaluation of the run yet"
            elif caption := plots.caption_of(run.plot(name)):
                notes[name] = caption
    for name, draw in drawings.items():
        try:
            draw(run.plot(name))
            outcome.drawn.append(name)
        except plots.NoData as reason:
            outcome.skipped[name] = str(reason)
        except Exception as exc:  # a report must never fail the run it describes
            log.warning("could not draw the %s plot of %s: %s: %s", name, run.root, type(exc).__name__, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            outcome.skipped[name], outcome.failed = f"failed: {exc}", [*outcome.failed, name]
    try:
        write_manifest(run)  # the page lists the plots' checksums
        write_report_html(run, {**notes, **outcome.skipped})
        write_manifest(run)
        outcome.html = run.report_html
    except Exception as exc:
        log.warning("could not write %s: %s: %s", run.report_html, type(exc).__name__, exc)
        outcome.failed.append("report.html")
    return outcome


def _evaluation_drawings(evaluation: ValEvaluation) -> dict[str, Callable[[Path], Path]]:
    from detpact.run import plots

    names, cfg = evaluation.class_names, evaluation.eval_cfg

    def confusion(path: Path) -> Path:
        matrix = confusion_matrix(ground_truth(evaluation.samples), evaluation.detections, len(names),
                                  cfg.score_threshold, cfg.iou_threshold)
        return plots.plot_confusion(matrix, names, path, cfg.score_threshold, cfg.iou_threshold,
                                    caption=evaluation.source)

    return {
        "pr_curves": lambda path: plots.plot_pr_curves(evaluation.pr_curves, path, caption=evaluation.source),
        "confusion": confusion,
        "val_images": lambda path: plots.plot_val_images(evaluation.samples, evaluation.detections, names, path,
                                                         cfg.score_threshold, caption=evaluation.source),
    }
