"""The public API: train, evaluate, export and predict. The CLI is a thin layer on top.

This is the entry layer: it reads the environment and the config once, then passes
narrow pieces down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from detpact.commands.data import preflight as preflight  # the API of the `data` verbs
from detpact.commands.data import show_samples as show_samples
from detpact.commands.model_info import describe_model
from detpact.config import (
    Config,
    config_hash,
    diff_configs,
    dump_config_yaml,
    load_config,
)
from detpact.data.build import DatasetSplits, build_datasets
from detpact.data.dataset import DetectionDataset, eval_loader
from detpact.engine.distributed import (
    barrier,
    close,
    init_distributed,
    launched_by_torchrun,
    process_device,
)
from detpact.engine.evaluate import evaluate as evaluate_model
from detpact.engine.evaluate import prepare_images
from detpact.engine.faults import parse_faults
from detpact.engine.loop import fit
from detpact.engine.plan import plan_training
from detpact.engine.runtime import check_amp, resolve_device, setup_determinism
from detpact.errors import CheckFailed, DetpactError, TrainingAborted, TrainingStopped
from detpact.evaluation.coco import evaluate_coco_json
from detpact.export.onnx import DeployModel, export_onnx, onnx_metadata
from detpact.export.parity import check_parity, describe_failure
from detpact.inference.predictions import coco_results_for, load_json, write_predictions
from detpact.inference.predictor import (
    LoadedModel,
    collect_images,
    draw_predictions,
    load_detector,
    predict_images,
)
from detpact.run.atomic import atomic_write_json, atomic_write_text, read_json
from detpact.run.contract import (
    RunDir,
    default_run_id,
    resolve_cache_dir,
    resolve_output_root,
    utc_now,
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

log = logging.getLogger(__name__)

CHECKPOINT_CHOICES = ("best", "last")


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
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    cfg, seed_source = seed_from_environment(cfg, environ, overrides)
    output_root = resolve_output_root(cfg.run.output_root, environ)
    if resume and not run_id:
        raise DetpactError("--resume needs the --run-id of the run to continue (its folder name under "
                           f"{output_root}).")
    if run_id is None and (ddp or launched_by_torchrun(environ)):
        raise DetpactError("Training with several processes needs --run-id: every process must write to the "
                           "same run folder.")
    ctx = init_distributed(environ, ddp, cfg.run.device)
    try:
        if not ctx.is_main:
            logging.getLogger("detpact").setLevel(logging.WARNING)  # rank 0 reports for all
        faults = parse_faults(environ.get("DETPACT_FAULT"), ctx.rank)
        run = RunDir.for_run_id(output_root, run_id or default_run_id(cfg.run.name, datetime.now()))
        drift: dict[str, Any] = {}
        bundle = open_for_training(run, cfg, ctx, resume, allow_drift, allow_world_size_change, drift)
        device = process_device(ctx, resolve_device(cfg.run.device))
        check_amp(cfg.run.amp, device)
        determinism = setup_determinism(cfg.run.seed, cfg.run.deterministic, resume_num_threads(cfg, bundle))
        data = build_datasets(cfg.data, _cache_dir(environ))
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

        try:
            result = fit(cfg, run, data, device, bundle, faults, cache_dir=_cache_dir(environ), ctx=ctx)
        except (TrainingStopped, TrainingAborted) as exc:
            if ctx.is_main and getattr(exc, "fit_result", None) is not None:
                report_interrupted(run, cfg, exc.fit_result, meta)
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
            raise
    set_phase(run.status, "done")
    write_manifest(run)
    return run


def evaluate(run_dir: str | Path, *, checkpoint: str = "best", environ: Mapping[str, str] | None = None,
             verify_config: str | Path | None = None, data_config: str | Path | None = None,
             out: str | Path | None = None) -> dict[str, Any]:
    """COCO metrics of a run's checkpoint on its validation split; writes reports/eval.json.

    data_config: evaluate on the validation split of this config's dataset instead (same
    classes required); the run folder is then left untouched and the report goes to `out`.
    """
    run = _open_run(run_dir, environ)
    loaded = load_detector(_checkpoint_path(run, checkpoint))
    if verify_config is not None:
        _verify_config(loaded, Path(verify_config))
    data = _run_data(loaded, environ) if data_config is None else _other_data(loaded, Path(data_config), environ)
    started = time.perf_counter()
    metrics = _evaluate_as_trained(run, loaded, data)
    report = {"checkpoint": checkpoint, "split": "val", "data_config": str(data_config) if data_config else None,
              "config_hash": loaded.bundle["config_hash"], "dataset_fingerprint": data.fingerprint,
              "step": loaded.bundle["progress"]["global_step"], "seconds": round(time.perf_counter() - started, 2),
              "time": utc_now(), "metrics": metrics}
    if data_config is None:
        atomic_write_json(run.eval_report, report)
        write_manifest(run)
    if out is not None:
        atomic_write_json(Path(out), report)
    return metrics


def evaluate_predictions(predictions: str | Path, *, gt: str | Path, bbox_format: str = "xyxy",
                         out: str | Path | None = None) -> dict[str, Any]:
    """COCO metrics of a predictions file (detpact's schema or COCO results JSON) against a
    COCO ground-truth file; the report goes to `out` when given."""
    ground_truth = load_json(Path(gt), "a COCO ground-truth file")
    started = time.perf_counter()
    metrics = evaluate_coco_json(ground_truth, coco_results_for(Path(predictions), ground_truth, bbox_format))
    if out is not None:
        atomic_write_json(Path(out), {"predictions": str(predictions), "ground_truth": str(gt),
                                      "seconds": round(time.perf_counter() - started, 2), "time": utc_now(),
                                      "metrics": metrics})
    return metrics


def verify(run_dir: str | Path, *, environ: Mapping[str, str] | None = None, reevaluate: bool = True) -> list[Check]:
    """Check a run folder against its records: every artifact against manifest.json, the
    config hash of config_resolved.yaml against run_meta.json and the checkpoints, the
    dataset fingerprint against the data on disk (a warning when it changed), and that
    best.pt re-evaluated reproduces its recorded map50_95 exactly. Returns the checks;
    the run passes when none has status "fail"."""
    run = _open_run(run_dir, environ)
    checks = check_manifest(run)
    verified = {check.name for check in checks if check.status == "pass"}
    checks += check_config_hashes(run, verified)
    checks += _status_check(run)
    checks += check_parity_report(run)
    if reevaluate:
        checks += _reevaluate_best(run, verified, environ)
    return checks


def export(run_dir: str | Path, *, checkpoint: str = "best", environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Export a run's checkpoint to exports/model.onnx and check parity with PyTorch on val images.

    Writes exports/model.onnx, model.onnx.meta.json and reports/onnx_parity.json. Under
    `export.parity_policy: fail` a failed parity check raises CheckFailed.
    """
    run = _open_run(run_dir, environ)
    ckpt_path = _checkpoint_path(run, checkpoint)
    # Exported and compared in float32 on the CPU, where onnxruntime runs too.
    loaded = load_detector(ckpt_path, torch.device("cpu"))
    cfg = loaded.config
    data = _run_data(loaded, environ)
    deploy = DeployModel(loaded.model)
    started = time.perf_counter()
    log.info("exporting %s to %s (%s exporter, opset %d)", ckpt_path, run.onnx_model, cfg.export.exporter, cfg.export.opset)
    export_onnx(deploy, run.onnx_model, cfg.data.image_size, cfg.export.opset, cfg.export.exporter)
    meta = onnx_metadata(cfg, loaded.class_names, loaded.bundle["config_hash"], cfg.export.exporter,
                         str(ckpt_path.relative_to(run.root)), loaded.model.nms_free)
    atomic_write_json(run.onnx_meta, meta)

    parity_samples = data.val[: cfg.export.parity_images]
    dataset = DetectionDataset(parity_samples, cfg.data.image_size, train=False)
    images = prepare_images(torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.device("cpu"), False).numpy()
    report = check_parity(deploy, str(run.onnx_model), images, cfg.model.postprocess,
                          cfg.export.parity_rtol, cfg.export.parity_atol)
    report = {"onnx": str(run.onnx_model.relative_to(run.root)), "policy": cfg.export.parity_policy,
              "images": [str(s.image_path) for s in parity_samples],
              "export_seconds": round(time.perf_counter() - started, 2), **report}
    atomic_write_json(run.onnx_parity, report)
    write_manifest(run)
    worst = {name: max(c["outputs"][name]["max_abs"] for c in report["checks"]) for name in ("boxes", "scores")}
    log.info("ONNX parity %s on %d images (max |diff| boxes %.2e, scores %.2e)", report["verdict"].upper(),
             len(images), worst["boxes"], worst["scores"])
    if report["verdict"] != "pass":
        message = f"ONNX parity check failed for {run.onnx_model}: {describe_failure(report)}. Details: {run.onnx_parity}."
        if cfg.export.parity_policy == "fail":
            raise CheckFailed(message)
        log.warning("%s (export.parity_policy is 'warn', continuing)", message)
    if (read_json(run.status) or {}).get("phase") == "export_failed":  # the export training left undone is done
        set_phase(run.status, "done")
    return report


def predict(run_dir: str | Path, images: Sequence[str | Path], *, out: str | Path,
            save_images: str | Path | None = None, checkpoint: str = "best",
            score_threshold: float = 0.25, environ: Mapping[str, str] | None = None) -> list[dict]:
    """Detect objects in image files with a run's checkpoint; write predictions JSON (and drawn images)."""
    run = _open_run(run_dir, environ)
    if not 0.0 <= score_threshold <= 1.0:
        raise DetpactError(f"--conf must be between 0 and 1, got {score_threshold}.")
    loaded = load_detector(_checkpoint_path(run, checkpoint))
    paths = collect_images(list(images))
    post_cfg = loaded.config.model.postprocess.model_copy(update={"score_threshold": score_threshold})
    records = predict_images(loaded, paths, post_cfg)
    meta = {"run": str(run.root), "checkpoint": checkpoint, "backend": "torch", "class_names": loaded.class_names,
            "config_hash": loaded.bundle["config_hash"], "score_threshold": score_threshold, "box_format": "xyxy pixels"}
    write_predictions(Path(out), records, meta)
    if save_images is not None:
        draw_predictions(records, Path(save_images))
    return records


# --- helpers of the entry layer ------------------------------------------------------


def model_info(config: str | Path, *, overrides: Sequence[str] = (), num_classes: int | None = None,
               image_size: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parameters, GFLOPs, output strides and channels and CPU forward time of a config's detector."""
    return describe_model(config, overrides=overrides, num_classes=num_classes, image_size=image_size,
                          cache_dir=_cache_dir(environ))


def _cache_dir(environ: Mapping[str, str] | None) -> Path:
    return resolve_cache_dir(os.environ if environ is None else environ)


def _checkpoint_path(run: RunDir, which: str) -> Path:
    if which not in CHECKPOINT_CHOICES:
        raise DetpactError(f"Unknown checkpoint {which!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}.")
    path = run.best_ckpt if which == "best" else run.last_ckpt
    if not path.is_file():
        raise DetpactError(f"No {which} checkpoint in {run.root} ({path} is missing): the run has not "
                           "validated or checkpointed yet. Train it (or resume it) first.")
    return path


def _open_run(run_dir: str | Path, environ: Mapping[str, str] | None) -> RunDir:
    environ = os.environ if environ is None else environ
    return RunDir.existing(run_dir, resolve_output_root(None, environ))


def _run_data(loaded: LoadedModel, environ: Mapping[str, str] | None) -> DatasetSplits:
    data = build_datasets(loaded.config.data, _cache_dir(environ))
    if data.fingerprint != loaded.bundle["dataset_fingerprint"]:
        log.warning("the dataset at %s changed since training (fingerprint differs): results may not be "
                    "comparable with the run's own numbers", data.root)
    return data


def _other_data(loaded: LoadedModel, data_config: Path, environ: Mapping[str, str] | None) -> DatasetSplits:
    """The dataset of another config, for evaluating a run on it: its classes must be the run's."""
    data = build_datasets(load_config(data_config).data, _cache_dir(environ))
    if data.class_names != loaded.class_names:
        raise DetpactError(f"The dataset of {data_config} has other classes than the run ({len(data.class_names)}: "
                           f"{', '.join(data.class_names[:4])}, ... vs {len(loaded.class_names)}: "
                           f"{', '.join(loaded.class_names[:4])}, ...). Evaluate on a dataset with the same class list, "
                           "in the same order.")
    return data


def _evaluate_as_trained(run: RunDir, loaded: LoadedModel, data: DatasetSplits) -> dict[str, Any]:
    """Validation metrics of `loaded`, computed as training computed them: same seed,
    determinism and thread count, so the numbers reproduce the logged ones exactly."""
    cfg = loaded.config
    threads = ((read_json(run.run_meta) or {}).get("determinism") or {}).get("num_threads")
    setup_determinism(cfg.run.seed, cfg.run.deterministic, threads)
    return evaluate_model(loaded.model, eval_loader(data.val, cfg.data, cfg.eval.batch_size), data.val,
                          data.class_names, cfg.model.postprocess, loaded.device, cfg.run.amp, cfg.run.channels_last)


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
    loaded = load_detector(run.best_ckpt)
    try:
        data = build_datasets(loaded.config.data, _cache_dir(environ))
    except DetpactError as exc:
        return [Check("dataset fingerprint", "warn", f"the data cannot be read: {exc.message}"),
                Check(name, "warn", "not run: the data cannot be read")]
    recorded_fp = (read_json(run.run_meta) or {}).get("dataset_fingerprint")
    checks = [Check("dataset fingerprint", "pass", f"{data.fingerprint[:12]} = run_meta.json")
              if data.fingerprint == recorded_fp else
              Check("dataset fingerprint", "warn", f"the data at {data.root} changed since training "
                                                   f"({data.fingerprint[:12]}, recorded {str(recorded_fp)[:12]})")]
    metrics = _evaluate_as_trained(run, loaded, data)
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


def _verify_config(loaded: LoadedModel, config_path: Path) -> None:
    cfg = load_config(config_path)
    if config_hash(cfg) != loaded.bundle["config_hash"]:
        diffs = diff_configs(loaded.bundle["config"], cfg)
        log.warning("config %s does not match the checkpoint's (hash differs): %s", config_path,
                    "; ".join(diffs[:10]) or "no key-level difference")
    else:
        log.info("config %s matches the checkpoint (hash %s)", config_path, loaded.bundle["config_hash"][:12])
