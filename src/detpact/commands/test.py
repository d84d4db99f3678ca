"""`detpact test SETTINGS.yaml (--run RUN | --predictions FILE)`: the scenario suite
(docs/robustness.md).

With --run, the run's checkpoint is scored on its validation split clean, under every
corruption and severity the settings name (the images corrupted before the letterbox),
and on every subset; the report goes to the run's reports/scenarios.json. With
--predictions, only the subsets apply (a file of detections cannot be re-run on corrupted
images): the corruption rows are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detpact.commands.evaluate import _coco_records, _data_for_predictions, first_images, predictions_on
from detpact.commands.runs import CHECKPOINT_CHOICES, checkpoint_path, open_run, run_data
from detpact.config import EvalConfig
from detpact.data.dataset import eval_loader
from detpact.data.formats import Sample
from detpact.engine.evaluate import Backend, TorchBackend, predict_loader
from detpact.engine.runtime import setup_determinism
from detpact.errors import DetpactError
from detpact.evaluation.coco import ImageDetections
from detpact.inference.predictions import BBOX_FORMATS, coco_results_for, load_json
from detpact.inference.predictor import LoadedModel, load_detector
from detpact.robustness.settings import load_settings
from detpact.robustness.suite import Scorer, corrupted_predictor, run_suite
from detpact.robustness.ttt import (
    TTTBackend,
    TTTSettings,
    add_ttt_arguments,
    combine_reports,
    ttt_settings,
    wrap_backend,
)
from detpact.run.atomic import atomic_write_json, read_json
from detpact.run.contract import utc_now, write_manifest
from detpact.run.reporting import write_reports

PREDICTIONS_SKIP = ("a predictions file holds detections of the clean images only; corruptions need the model "
                    "(run `detpact test SETTINGS --run RUN`)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    test = commands.add_parser(
        "test", help="the scenario suite: mAP under image corruptions and on subsets, with the drop from clean")
    test.add_argument("settings", metavar="SETTINGS", help="scenario settings YAML, e.g. configs/scenarios/default.yaml")
    test.add_argument("--run", metavar="RUN", help="run folder or id: its checkpoint on its validation split; with "
                                                   "--predictions, the run whose validation split is the ground truth")
    test.add_argument("--predictions", metavar="FILE",
                      help="score this predictions file (subsets only) against --gt, --data or --run's split")
    test.add_argument("--gt", metavar="COCO_JSON", help="with --predictions: a COCO ground-truth file")
    test.add_argument("--data", metavar="CONFIG_OR_DATASET",
                      help="with --predictions: the validation split of this config's dataset or dataset folder")
    test.add_argument("--bbox-format", choices=BBOX_FORMATS, default="xyxy",
                      help="with --predictions: layout of the boxes in a detpact predictions file")
    test.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best", help="with --run (default best)")
    test.add_argument("--max-images", type=int, metavar="N", help="only the first N images (overrides the settings)")
    test.add_argument("--out", metavar="FILE", help="also write the report (JSON) to FILE")
    add_ttt_arguments(test)  # --ttt, --ttt-preset, ... (robustness/ttt): adapt on each scenario's images


def run(args: argparse.Namespace) -> int:
    report = scenario_test(args.settings, run_dir=args.run, predictions=args.predictions, gt=args.gt, data=args.data,
                           bbox_format=args.bbox_format, checkpoint=args.checkpoint, max_images=args.max_images,
                           out=args.out, ttt=ttt_settings(args))
    print_report(report)
    return 0


def scenario_test(settings: str | Path, *, run_dir: str | Path | None = None, predictions: str | Path | None = None,
                  gt: str | Path | None = None, data: str | Path | None = None, bbox_format: str = "xyxy",
                  checkpoint: str = "best", max_images: int | None = None, out: str | Path | None = None,
                  environ: Mapping[str, str] | None = None, progress: bool = True,
                  ttt: TTTSettings | None = None) -> dict[str, Any]:
    """The scenario suite's report (also written to the run's reports/scenarios.json with a
    run's model, and to `out` when given).

    ttt: test-time training, a fresh adaptation for the clean split and for each corrupted
    one; the report says what it did under "ttt" and goes to `out` only (the run's
    scenarios.json records the model as trained).
    """
    settings_path = Path(settings)
    scenarios = load_settings(settings_path)
    limit = max_images if max_images is not None else scenarios.max_images
    started = time.perf_counter()
    if predictions is not None and ttt is not None:
        raise DetpactError("--ttt adapts a run's model: it applies with --run, not with --predictions.")
    if predictions is None:
        if gt is not None or data is not None or run_dir is None:
            raise DetpactError("detpact test without --predictions scores a run's model on its validation split: "
                               "pass --run RUN (and no --gt / --data).")
        run = open_run(run_dir, environ)
        loaded = load_detector(checkpoint_path(run, checkpoint))
        cfg = loaded.config
        splits = run_data(loaded, environ)
        samples = first_images(splits.val, limit)
        threads = ((read_json(run.run_meta) or {}).get("determinism") or {}).get("num_threads")
        setup_determinism(cfg.run.seed, cfg.run.deterministic, threads)  # as training's validation ran
        adapted: list[TTTBackend] = []  # the TTT backends, clean split first, to report what they did
        batch_size = ttt.batch_size if ttt is not None else cfg.eval.batch_size
        clean = predict_loader(scenario_backend(loaded, ttt, adapted), eval_loader(samples, cfg.data, batch_size))
        predict_corrupted = corrupted_predictor(lambda: scenario_backend(loaded, ttt, adapted), samples, cfg.data,
                                                batch_size, splits.root, scenarios.seed)
        scorer = Scorer(samples, splits.class_names, cfg.model.postprocess.max_det, cfg.eval)
        suite = run_suite(scenarios, samples, splits.class_names, scorer, clean, predict_corrupted, progress=progress)
        facts = {"source": {"checkpoint": checkpoint, "path": str(checkpoint_path(run, checkpoint))},
                 "dataset_root": str(splits.root), "dataset_fingerprint": splits.fingerprint,
                 "config_hash": loaded.bundle["config_hash"], "step": loaded.bundle["progress"]["global_step"]}
        if ttt is not None:
            facts["ttt"] = combine_reports([backend.report for backend in adapted])
    else:
        samples, class_names, clean, facts = _predictions_source(Path(predictions), gt, run_dir, data, bbox_format,
                                                                 limit, environ)
        scorer = Scorer(samples, class_names, 100, EvalConfig())  # 100 detections per image, as eval --predictions
        suite = run_suite(scenarios, samples, class_names, scorer, clean, None, PREDICTIONS_SKIP, progress=progress)
        run = None
    report = {"settings": str(settings_path), "seed": scenarios.seed, **facts, "split": "val",
              "num_images": len(samples), **suite, "seconds": round(time.perf_counter() - started, 2),
              "time": utc_now()}
    if run is not None and ttt is None:
        atomic_write_json(run.scenarios_report, report)
        write_manifest(run)
        if loaded.config.logging.reports:  # report.html gets the scenarios table; its plots stay as they are
            write_reports(run, None, missing_evaluation="not drawn yet (detpact report RUN draws it)")
    if out is not None:
        atomic_write_json(Path(out), report)
    return report


def scenario_backend(loaded: LoadedModel, ttt: TTTSettings | None = None, adapted: list | None = None) -> Backend:
    """The backend every scenario's images go through (called once for the clean split and
    once per corrupted split, so each gets a fresh one).

    Hook point: test-time training wraps the backend returned here (it adapts on the
    scenario's own batches); nothing else in the suite builds a backend.
    """
    cfg = loaded.config
    backend = TorchBackend(loaded.model.eval(), cfg.model.postprocess, loaded.device, cfg.run.amp,
                           cfg.run.channels_last)
    backend = wrap_backend(backend, loaded, ttt)  # with --ttt: a fresh adaptation of a copy of the model
    if ttt is not None and adapted is not None:
        adapted.append(backend)
    return backend


def _predictions_source(predictions: Path, gt: str | Path | None, run_dir: str | Path | None,
                        data: str | Path | None, bbox_format: str, limit: int | None,
                        environ: Mapping[str, str] | None
                        ) -> tuple[list[Sample], list[str], list[ImageDetections], dict[str, Any]]:
    """The samples, class names and detections of a predictions file, and the report's facts."""
    if sum(x is not None for x in (gt, run_dir, data)) != 1:
        raise DetpactError("detpact test --predictions FILE needs one ground truth to score it against: --gt "
                           "COCO_JSON, --run RUN (its validation split) or --data CONFIG_OR_DATASET.")
    facts: dict[str, Any] = {"source": {"predictions": str(predictions)}}
    if gt is not None:
        ground_truth = load_json(Path(gt), "a COCO ground-truth file")
        gts, found, class_names = _coco_records(ground_truth, coco_results_for(predictions, ground_truth, bbox_format))
        names = {image["id"]: image.get("file_name", str(image["id"])) for image in ground_truth["images"]}
        samples = [Sample(Path(names[g.image_id]), g.width, g.height, g.boxes.astype(np.float32), g.labels, g.iscrowd)
                   for g in gts]
        # The suite numbers images by their place in the split.
        detections = [ImageDetections(i, d.boxes, d.scores, d.labels) for i, d in enumerate(found)]
        samples = first_images(samples, limit)
        detections = detections[:len(samples)]
        return samples, class_names, detections, {**facts, "ground_truth": str(gt)}
    splits = _data_for_predictions(run_dir, data, environ)
    samples = first_images(splits.val, limit)
    detections = predictions_on(predictions, samples, splits.class_names, bbox_format)
    return samples, splits.class_names, detections, {**facts, "data": str(data if data is not None else run_dir),
                                                     "dataset_root": str(splits.root),
                                                     "dataset_fingerprint": splits.fingerprint}


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def print_report(report: dict[str, Any]) -> None:
    """The scenario table, the skipped rows and the robustness summary."""
    table = Table(title=f"scenarios: {escape(report['settings'])} ({report['num_images']} images)",
                  header_style="bold", box=None, title_justify="left")
    for column in ("scenario", "images", "mAP50-95", "mAP50", "drop50-95", "drop50"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for row in [report["clean"], *report["scenarios"]]:
        # drop = clean - scenario, printed as the change from clean (negative = worse)
        change = [None if row.get(k) is None else 0.0 - row[k] for k in ("drop_map50_95", "drop_map50")]
        table.add_row(escape(row["name"]), str(row["num_images"]), _cell(row["map50_95"]), _cell(row["map50"]),
                      _cell(change[0], True), _cell(change[1], True))
    out = Console(width=max(100, Console().width))
    out.print(table)
    if report["skipped"]:
        out.print(f"skipped {len(report['skipped'])} corruption scenario(s) "
                  f"({escape(', '.join(row['name'] for row in report['skipped']))}): {escape(report['skipped'][0]['reason'])}")
    summary = report["summary"]
    if summary is not None:
        rpc = "-" if summary["rpc"] is None else f"{summary['rpc']:.3f}"
        out.print(f"robustness: mPC {summary['mpc']:.3f} (mean mAP50-95 over {summary['corruption_rows']} corruption "
                  f"rows), rPC {rpc} (mPC / clean {report['clean']['map50_95']:.3f})")
    if report.get("ttt"):
        ttt = report["ttt"]
        fired = ", ".join(f"{name} {count}" for name, count in ttt["guards"].items())
        out.print(f"test-time training ({escape(ttt['settings']['preset'])}): adapted {ttt['adapted_batches']} of "
                  f"{ttt['batches']} batches in {ttt['adapt_seconds']:.1f} s; guards fired: {fired}")
