"""`detpact report RUN`: (re)write a run's plots and its self-contained reports/report.html.

The training curves are drawn from the run's metric logs; the PR curves, the confusion
matrix and the validation images from an evaluation of checkpoints/best.pt on the run's
validation split, made as training's validation makes it (commands/evaluate.py).
Training calls `report_after_training` when it ends; `detpact eval` on the run's own data
redraws the evaluation plots from the detections it has just scored.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

from detpact.commands.evaluate import predict_as_trained
from detpact.commands.runs import checkpoint_path, open_run, run_data
from detpact.engine.evaluate import score
from detpact.errors import DetpactError
from detpact.inference.predictor import load_detector
from detpact.run.contract import RunDir
from detpact.run.reporting import ReportOutcome, ValEvaluation, write_reports

log = logging.getLogger(__name__)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report", help="write a run's plots and its self-contained reports/report.html (opens with no server)")
    parser.add_argument("run_dir", metavar="RUN", help="the run folder (e.g. runs/exp01) or its id")
    parser.add_argument("--no-eval", action="store_true",
                        help="do not re-evaluate best.pt: keep the PR curves, confusion matrix and image grid on disk")


def run(args: argparse.Namespace) -> int:
    outcome = report(args.run_dir, evaluate=not args.no_eval)
    for name, why in outcome.skipped.items():
        print(f"{name}: not drawn ({why})")
    if outcome.html is not None:
        print(f"wrote {outcome.html} ({len(outcome.drawn)} plots drawn)")
    return 1 if outcome.failed else 0


def report(run_dir: str | Path, *, evaluate: bool = True, environ: Mapping[str, str] | None = None) -> ReportOutcome:
    """Write the plots and report.html of a run (a folder, or an id under the output root).

    evaluate: evaluate best.pt on the run's validation split for the PR curves, the
    confusion matrix and the image grid (a DetpactError when the run has no best.pt);
    False keeps those plots as they are on disk.
    """
    run = open_run(run_dir, environ)
    if evaluate and not run.best_ckpt.is_file():
        raise DetpactError(f"{run.root} has no checkpoints/best.pt yet (it has not validated): train or resume it, "
                           "or pass --no-eval to draw only the training curves.")
    evaluation = evaluate_best(run, environ) if evaluate else None
    return write_reports(run, evaluation, missing_evaluation="not re-evaluated (--no-eval)")


def report_after_training(run: RunDir, environ: Mapping[str, str] | None) -> None:
    """The reports of a run that has just trained. Never raises: the run is complete
    whatever happens here, so a failure is a logged warning."""
    evaluation, why = None, None
    try:
        evaluation = evaluate_best(run, environ)
    except Exception as exc:
        why = f"the evaluation of best.pt failed: {exc}"
        log.warning("report of %s: %s", run.root, why)
    try:
        outcome = write_reports(run, evaluation, missing_evaluation=why)
    except Exception as exc:
        log.warning("could not write the reports of %s: %s: %s", run.root, type(exc).__name__, exc)
        return
    if outcome.html is not None:
        log.info("report: %s (%d plots)", outcome.html, len(outcome.drawn))


def evaluate_best(run: RunDir, environ: Mapping[str, str] | None) -> ValEvaluation:
    """best.pt's detections on the run's whole validation split, with the PR curves."""
    loaded = load_detector(checkpoint_path(run, "best"))
    splits = run_data(loaded, environ)
    cfg = loaded.config
    detections = predict_as_trained(run, loaded, splits.val)
    metrics = score(splits.val, detections, splits.class_names, cfg.model.postprocess.max_det, cfg.eval, curves=True)
    source = f"best.pt at step {loaded.bundle['progress']['global_step']}, {len(splits.val)} validation images"
    return ValEvaluation(source, splits.val, detections, metrics["pr_curves"], splits.class_names, cfg.eval)
