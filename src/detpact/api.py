"""The public API: train, evaluate, export and predict. The CLI is a thin layer on top.

This is the entry layer: it reads the environment and the config once, then passes
narrow pieces down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from detpact.commands.data import preflight as preflight  # the verbs the API offers
from detpact.commands.data import show_samples as show_samples
from detpact.commands.evaluate import evaluate as evaluate
from detpact.commands.evaluate import evaluate_as_trained
from detpact.commands.evaluate import evaluate_checkpoint as evaluate_checkpoint
from detpact.commands.evaluate import evaluate_onnx as evaluate_onnx
from detpact.commands.evaluate import evaluate_predictions as evaluate_predictions
from detpact.commands.model_info import describe_model
from detpact.commands.predict import BACKENDS as BACKENDS
from detpact.commands.predict import predict as predict
from detpact.commands.record import record_run_of, record_training, registry_from_environment
from detpact.commands.report import report as report
from detpact.commands.report import report_after_training
from detpact.commands.runs import CHECKPOINT_CHOICES as CHECKPOINT_CHOICES
from detpact.commands.runs import cache_dir, checkpoint_path, open_run, run_data
from detpact.config import Config, dump_config_yaml, load_config_or_dataset
from detpact.data.build import build_datasets
from detpact.engine.distributed import (
    Distributed,
    barrier,
    close,
    init_distributed,
    launched_by_torchrun,
    process_device,
    restart_attempt,
)
from detpact.engine.faults import parse_faults
from detpact.engine.loop import fit
from detpact.engine.plan import plan_training
from detpact.engine.runtime import check_amp, resolve_device, setup_determinism
from detpact.errors import DetpactError
from detpact.inference.predictor import load_detector
from detpact.run.atomic import atomic_write_text, read_json
from detpact.run.contract import (
    RunDir,
    default_run_id,
    resolve_output_root,
    write_manifest,
)
from detpact.run.session import (
    finish_train_report,
    open_for_training,
    report_interrupted,
    resume_num_threads,
    seed_from_environment,
    write_run_meta,
)
from detpact.run.status import set_phase
from detpact.run.verify import Check, check_config_hashes, check_manifest, check_parity_report
from detpact.tracking import NO_TRACKER, TrackerSet, check_tracking, finish_tracking, start_tracking

log = logging.getLogger(__name__)



def train(
    config: str | Path | Config,
    *,
    run_id: str | None = None,
    resume: bool = False,
    allow_drift: bool = False,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    ddp: bool = False,
    allow_world_size_change: bool = False,
) -> RunDir:
    """Train a detector per `config` into `<output_root>/<run_id>`; returns the run folder.

    With `resume=True`, continue the run from its `checkpoints/last.pt`; the config must
    hash the same as the one the run was started with, and the dataset must be unchanged,
    unless `allow_drift` (then the differences are logged and recorded in run_meta.json).
    Under torchrun (or with `ddp`, which requires it) every process trains its share of
    each batch and rank 0 writes the run; a resume needs the number of processes the run
    was trained with unless `allow_world_size_change`.
    """
    environ = os.environ if environ is None else environ
    cfg = config if isinstance(config, Config) else load_config_or_dataset(config, overrides)
    cfg, seed_source = seed_from_environment(cfg, environ, overrides)
    cfg = registry_from_environment(cfg, environ, overrides)  # where the run is registered (commands/record.py)
    output_root = resolve_output_root(cfg.run.output_root, environ)
    if resume and not run_id:
        raise DetpactError("--resume needs the --run-id of the run to continue (its folder name under "
                           f"{output_root}).")
    if run_id is None and (ddp or launched_by_torchrun(environ)):
        raise DetpactError("Training with several processes needs --run-id: every process must write to the "
                           "same run folder.")
    ctx = init_distributed(environ, ddp, cfg.run.device, cfg.train.ddp.timeout_s)
    try:
        if not ctx.is_main:
            logging.getLogger("detpact").setLevel(logging.WARNING)  # rank 0 reports for all
        attempt = restart_attempt(environ)
        faults = parse_faults(environ.get("DETPACT_FAULT"), ctx.rank, attempt)
        run = RunDir.for_run_id(output_root, run_id or default_run_id(cfg.run.name, datetime.now()))
        if attempt and not resume and run.config_resolved.is_file():
            # torchrun --max-restarts started the workers again after one failed: the
            # same command line goes on from the run's newest verified checkpoint.
            if ctx.is_main:
                log.warning("torchrun restarted the training processes (restart %d): resuming %s", attempt, run.root)
            resume = True
        drift: dict[str, Any] = {}
        bundle = open_for_training(run, cfg, ctx, resume, allow_drift, allow_world_size_change, drift)
        device = process_device(ctx, resolve_device(cfg.run.device))
        check_amp(cfg.run.amp, device)
        if cfg.export.onnx:  # an export that cannot succeed is refused now, not after training
            from detpact.commands.export import check_export_settings  # onnx: loaded when an export is due

            check_export_settings(cfg.export, cfg.export.opset, cfg.export.half)
        check_tracking(cfg.logging)  # a missing `tracking` extra is refused before anything is written
        determinism = setup_determinism(cfg.run.seed, cfg.run.deterministic, resume_num_threads(cfg, bundle))
        data = build_datasets(cfg.data, cache_dir(environ))
        if bundle is not None and bundle["dataset_fingerprint"] != data.fingerprint:
            if not allow_drift:
                raise DetpactError(
                    f"Cannot resume {run.root}: the dataset at {data.root} changed since the checkpoint was written "
                    "(fingerprint differs). Restore the data, start a new run, or pass --allow-drift to continue "
                    "on the new data anyway (recorded in run_meta.json)."
                )
            log.warning("resuming on changed data (--allow-drift): the dataset fingerprint differs from the "
                        "checkpoint's")
            drift["dataset_fingerprint"] = {"checkpoint": bundle["dataset_fingerprint"], "now": data.fingerprint}
        plan_training(cfg.train, len(data.train), ctx.world_size)  # a split too small: before the folder exists
        meta = None
        if ctx.is_main:
            run.create()
            atomic_write_text(run.config_resolved, dump_config_yaml(cfg))
            meta = write_run_meta(run, cfg, data, device, determinism, resumed=resume, drift=drift,
                                  seed_source=seed_source, distributed=ctx.describe())
            log.info("run folder: %s (dataset: %s, %s)", run.root, data.mode, data.root)
        barrier(ctx)  # the folder exists before any rank trains

        # TensorBoard / MLflow (logging.*), rank 0 only; a tracker that fails never stops the run.
        tracker = start_tracking(cfg, run, meta, bundle) if ctx.is_main else NO_TRACKER
        try:
            result = fit(cfg, run, data, device, bundle, faults, cache_dir=cache_dir(environ), ctx=ctx,
                         tracker=tracker)
        except BaseException as exc:
            # A stopped or aborted run writes its report, saying why; a crashed one has its
            # status.json say "failed". Either way the trackers and the registry hear of it.
            if ctx.is_main and getattr(exc, "fit_result", None) is not None:
                report_interrupted(run, cfg, exc.fit_result, meta)
            _session_ended(tracker, run, cfg, ctx, exc)
            raise
        if ctx.is_main:
            finish_train_report(run, cfg, result, meta)
        # The ranks leave the process group together: one tearing its connections down
        # while another still uses them can abort that process.
        barrier(ctx)
    finally:
        close(ctx)
    if not ctx.is_main:
        return run  # rank 0 exports and writes the manifest
    if cfg.export.onnx:
        set_phase(run.status, "export")
        try:
            export(run.root, environ=environ)
        except BaseException as exc:
            # Training is complete and its checkpoints are final: only the export is missing or
            # untrustworthy, and `runs verify` reports the same (see _status_check).
            set_phase(run.status, "export_failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _session_ended(tracker, run, cfg, ctx, exc)
            raise
    set_phase(run.status, "done")
    if cfg.logging.reports:
        report_after_training(run, environ)  # plots + reports/report.html; a failure there is only a warning
    write_manifest(run)
    _session_ended(tracker, run, cfg, ctx)
    return run


def _session_ended(tracker: TrackerSet, run: RunDir, cfg: Config, ctx: Distributed,
                   failure: BaseException | None = None) -> None:
    """However training ended: the trackers upload the run's files and close, recording the
    outcome in train_report.json, and the registry records the run (rank 0). Neither raises."""
    finish_tracking(tracker, run, failure)
    if ctx.is_main:
        record_training(run, cfg)


def verify(run_dir: str | Path, *, environ: Mapping[str, str] | None = None, reevaluate: bool = True) -> list[Check]:
    """Check a run folder against its records: every artifact against manifest.json, the
    config hash of config_resolved.yaml against run_meta.json and the checkpoints, the
    dataset fingerprint against the data on disk (a warning when it changed), and that
    best.pt re-evaluated reproduces its recorded map50_95 exactly. Returns the checks;
    the run passes when none has status "fail"."""
    run = open_run(run_dir, environ)
    checks = check_manifest(run)
    verified = {check.name for check in checks if check.status == "pass"}
    checks += check_config_hashes(run, verified)
    checks += _status_check(run)
    checks += check_parity_report(run)
    if reevaluate:
        checks += _reevaluate_best(run, verified, environ)
    return checks


def export(run_dir: str | Path, *, checkpoint: str = "best", opset: int | None = None, nms: bool | None = None,
           half: bool | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Export a run's checkpoint to exports/model.onnx and check parity with PyTorch on val images.

    Writes exports/model.onnx, model.onnx.meta.json and reports/onnx_parity.json; `opset`,
    `nms` (postprocessing inside the graph) and `half` override the config's `export:`.
    Under `export.parity_policy: fail` a failed parity check raises CheckFailed.
    """
    run = open_run(run_dir, environ)
    ckpt_path = checkpoint_path(run, checkpoint)
    # Exported and compared in float32 on the CPU, where onnxruntime runs too.
    loaded = load_detector(ckpt_path, torch.device("cpu"), merge_lora=False)  # LoRA: merged by export_run
    export_cfg = loaded.config.export
    from detpact.commands.export import check_export_settings, export_run

    check_export_settings(export_cfg, export_cfg.opset if opset is None else opset,
                          export_cfg.half if half is None else half)
    report = export_run(run, loaded, run_data(loaded, environ), ckpt_path, opset=opset, nms=nms, half=half)
    write_manifest(run)
    if (read_json(run.status) or {}).get("phase") == "export_failed":  # the export training left undone is done
        set_phase(run.status, "done")
    record_run_of(run, environ)  # the export in the registry (never raises)
    return report


# --- helpers of the entry layer ------------------------------------------------------


def model_info(config: str | Path, *, overrides: Sequence[str] = (), num_classes: int | None = None,
               image_size: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parameters, GFLOPs, output strides and channels and CPU forward time of a config's detector."""
    return describe_model(config, overrides=overrides, num_classes=num_classes, image_size=image_size,
                          cache_dir=cache_dir(environ))


def _status_check(run: RunDir) -> list[Check]:
    status = read_json(run.status) or {}
    phase = status.get("phase")
    if phase == "done":
        return []
    if phase == "export_failed":
        return [Check("status.json", "fail", f"training finished, but the export failed: {status.get('error')}")]
    return [Check("status.json", "warn", f"the run's phase is {phase!r}, not 'done': it is still running or was "
                                         "interrupted, so its files may still change")]


def _reevaluate_best(run: RunDir, verified: set[str], environ: Mapping[str, str] | None) -> list[Check]:
    name = "best.pt re-evaluated"
    if "checkpoints/best.pt" not in verified:
        return [Check(name, "fail", "not run: checkpoints/best.pt is missing or failed its checksum")]
    loaded = load_detector(run.best_ckpt, merge_lora=False)  # as validation ran: LoRA adapters unmerged
    try:
        data = build_datasets(loaded.config.data, cache_dir(environ))
    except DetpactError as exc:
        return [Check("dataset fingerprint", "warn", f"the data cannot be read: {exc.message}"),
                Check(name, "warn", "not run: the data cannot be read")]
    recorded_fp = (read_json(run.run_meta) or {}).get("dataset_fingerprint")
    checks = [Check("dataset fingerprint", "pass", f"{data.fingerprint[:12]} = run_meta.json")
              if data.fingerprint == recorded_fp else
              Check("dataset fingerprint", "warn", f"the data at {data.root} changed since training "
                                                   f"({data.fingerprint[:12]}, recorded {str(recorded_fp)[:12]})")]
    metrics = evaluate_as_trained(run, loaded, data.val, data.class_names, loaded.config.eval)
    best = loaded.bundle["best_metric"]
    metric = best.get("metric", "map50_95")  # train.checkpoint.best_metric
    score, recorded = metrics[metric], best.get("value", best["map50_95"])
    if score == recorded:
        checks.append(Check(name, "pass", f"{metric} {score!r} = recorded (step {best['step']})"))
    elif data.fingerprint != loaded.bundle["dataset_fingerprint"]:
        checks.append(Check(name, "warn", f"{metric} {score!r}, recorded {recorded!r}: not comparable, best.pt was "
                                          "validated on other data"))
    else:
        checks.append(Check(name, "fail", f"{metric} {score!r} differs from the recorded {recorded!r} (on {loaded.device})"))
    return checks


