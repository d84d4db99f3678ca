"""A training session's bookkeeping: what a resume starts from (checkpoint, config and
thread checks) and the records a session writes (run_meta.json, train_report)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from detpact.config import Config, config_hash, diff_configs, load_config, resolved_dict, validate_config
from detpact.data.build import DatasetSplits
from detpact.engine.distributed import Distributed, broadcast_from_main
from detpact.errors import DetpactError
from detpact.evaluation.coco import format_table
from detpact.run.atomic import atomic_write_json, read_json
from detpact.run.checkpoint import load_checkpoint, resume_checkpoint
from detpact.run.contract import RunDir, git_info, host_info, library_versions, utc_now, write_manifest
from detpact.run.metrics import truncate_jsonl, write_csv_mirror
from detpact.run.report import write_train_report

if TYPE_CHECKING:
    from detpact.engine.loop import FitResult

log = logging.getLogger(__name__)


def resume_bundle(run: RunDir, cfg: Config, drift: dict[str, Any], allow_drift: bool) -> dict[str, Any] | None:
    """The bundle to resume `run` from; None for a run stopped before its first checkpoint,
    which then restarts from step 0 in the same folder. Config drift is refused, or with
    `allow_drift` recorded into `drift`."""
    if not run.last_ckpt.is_file() and not run.prev_ckpt.is_file():
        if not run.config_resolved.is_file():
            raise DetpactError(f"Cannot resume: no checkpoint at {run.last_ckpt}. Check --run-id (and "
                               "run.output_root), or start the run without --resume.")
        check_config_drift(run, resolved_dict(load_config(run.config_resolved)), cfg, drift, allow_drift)
        log.warning("%s has no checkpoint yet (the run stopped before its first one): training restarts "
                    "from step 0", run.root)
        for path in (run.train_metrics, run.val_metrics):
            truncate_jsonl(path, 0)
        return None
    bundle, _ = resume_checkpoint(run, cfg.train.checkpoint.keep_epochs)
    check_config_drift(run, bundle["config"], cfg, drift, allow_drift)
    return bundle


def check_config_drift(run: RunDir, started_with: dict[str, Any], cfg: Config, drift: dict[str, Any],
                        allow_drift: bool) -> None:
    started_with = upgraded(started_with)
    before, now = config_hash(started_with), config_hash(cfg)
    if before == now:
        return
    diffs = diff_configs(started_with, cfg)
    if not allow_drift:
        listing = "\n".join(f"  - {d}" for d in diffs) or "  (no key-level difference found)"
        raise DetpactError(f"Cannot resume {run.root}: the config differs from the one the run was started "
                           f"with (then -> now):\n{listing}\nResume with the original config, start a new run "
                           "with --run-id, or pass --allow-drift to continue with the new config anyway "
                           "(recorded in run_meta.json).")
    log.warning("resuming with a changed config (--allow-drift): %s", "; ".join(diffs))
    drift["config"] = {"changes": diffs, "config_hash_before": before, "config_hash_now": now}


def upgraded(started_with: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config resolved by this version's schema: a key added since it was
    written takes its default, which is no change the user made. A config this schema no
    longer reads (a removed key) stays as stored, and its differences show as drift."""
    try:
        return resolved_dict(validate_config(started_with))
    except DetpactError:
        return started_with


def check_world_size(bundle: dict[str, Any] | None, world_size: int, allow_change: bool,
                     drift: dict[str, Any]) -> None:
    """Refuse to resume with another number of processes than the run was trained with
    (the global batch, the data shards and so the results would change), unless allowed."""
    if bundle is None:
        return
    before = bundle.get("runtime", {}).get("world_size", 1)
    if before == world_size:
        return
    if not allow_change:
        launch = f"torchrun --nproc_per_node={before} -m detpact train ..." if before > 1 else "detpact train ..."
        raise DetpactError(
            f"Cannot resume: the run was trained with {before} process(es), and this resume has {world_size}. "
            "Another count changes the global batch and the data each process sees, so the run would not be "
            f"exact. Resume with {launch} --resume, or pass --allow-world-size-change to go on anyway "
            "(recorded in run_meta.json).")
    log.warning("resuming with %d process(es) instead of %d (--allow-world-size-change): the run is no longer "
                "exact", world_size, before)
    drift["world_size"] = {"checkpoint": before, "now": world_size}


def resume_num_threads(cfg: Config, bundle: dict[str, Any] | None) -> int | None:
    """run.num_threads, else on resume the count the run was trained with (CPU bits depend on it)."""
    recorded = (bundle or {}).get("runtime", {}).get("num_threads")
    if cfg.run.num_threads and recorded and cfg.run.num_threads != recorded:
        log.warning("run.num_threads is %d but the run was trained with %d threads: the resumed run will not be "
                    "bit-identical to an uninterrupted one", cfg.run.num_threads, recorded)
    return cfg.run.num_threads or recorded


def seed_from_environment(cfg: Config, environ: Mapping[str, str], overrides: Sequence[str]) -> tuple[Config, str]:
    """`cfg` with run.seed from $DETPACT_SEED when it is set (a --set run.seed=N still wins:
    CLI > environment > file), and where the seed came from: "config", "DETPACT_SEED" or "--set"."""
    if any(o.partition("=")[0].strip() == "run.seed" for o in overrides):
        return cfg, "--set"
    text = environ.get("DETPACT_SEED", "").strip()
    if not text:
        return cfg, "config"
    try:
        seed = int(text)
    except ValueError:
        raise DetpactError(f"DETPACT_SEED must be an integer, got {text!r}. Unset it or set e.g. DETPACT_SEED=1.") from None
    raw = resolved_dict(cfg)
    raw["run"]["seed"] = seed
    return validate_config(raw, source="the config with DETPACT_SEED"), "DETPACT_SEED"


def write_run_meta(run: RunDir, cfg: Config, data: DatasetSplits, device: torch.device,
                    determinism: dict, resumed: bool, drift: dict[str, Any], seed_source: str = "config",
                    distributed: dict[str, Any] | None = None) -> dict[str, Any]:
    previous = read_json(run.run_meta)
    now = utc_now()
    meta = previous if resumed and previous else {
        "run_id": run.root.name, "start_time": now, "end_time": None, "resumes": [],
    }
    if resumed:
        meta.setdefault("resumes", []).append({"time": now, "argv": host_info()["argv"],
                                               **({"allowed_drift": drift} if drift else {})})
    meta.update({
        "config_hash": config_hash(cfg),
        "dataset": data.summary(),
        "dataset_fingerprint": data.fingerprint,
        "seed": cfg.run.seed,
        "seed_source": seed_source,
        "determinism": determinism,
        **git_info(Path(__file__).resolve().parents[1]),
        "versions": library_versions(),
        "device": str(device),
        "amp": cfg.run.amp,
        "world_size": (distributed or {}).get("world_size", 1),
        "distributed_backend": (distributed or {}).get("backend"),
        **host_info(),
    })
    atomic_write_json(run.run_meta, meta)
    return meta


def finish_train_report(run: RunDir, cfg: Config, result: FitResult, meta: dict) -> None:
    meta["end_time"] = utc_now()
    atomic_write_json(run.run_meta, meta)
    summary = {
        "run_id": run.root.name,
        "config_hash": meta["config_hash"],
        "dataset": meta["dataset"],
        "dataset_fingerprint": meta["dataset_fingerprint"],
        # The validation that wrote best.pt: its metric (train.checkpoint.best_metric), mode and value.
        "best": asdict(result.best),
        "resumed_from_step": result.start_step or None,
        # Why training ended: "steps_done" (epochs / max_steps), "early_stop" (train.early_stop),
        # "time_budget" (train.time_budget), "signal" (SIGINT/SIGTERM: resumable),
        # "nonfinite_abort" (train.nonfinite), "disk_full" or "aborted".
        "end_reason": result.end_reason,
        "final_val": result.last_val,
        # Starting weights (load reports of model.init_from / model.backbone.weights) and freezing.
        "weights": result.weights,
        # The optimizer's parameter groups: sizes, lr multipliers, weight decay.
        "optimizer": {"name": cfg.train.optimizer.name, "groups": result.optimizer_groups},
        # Batch sizes per process and over all processes, steps per epoch and in all.
        "plan": result.plan.describe() if result.plan else None,
        "counters": {
            "steps": result.progress.global_step, "epochs": result.progress.epoch,
            "samples_seen": result.progress.samples_seen, "nonfinite_skipped": result.nonfinite_skipped,
            # Skipped steps by cause (a step can have more than one).
            **{f"{kind}_steps": count for kind, count in result.skip_counts.items()},
            "num_params": result.num_params, "train_seconds": round(result.train_seconds, 2),
            # Speed of this session only (a resumed run's earlier sessions are not timed here).
            "samples_per_s": (result.progress.samples_seen - result.start_samples) / max(result.train_seconds, 1e-9),
        },
    }
    write_train_report(run, summary)
    if cfg.logging.metrics_csv:
        write_csv_mirror(run.train_metrics, run.train_metrics_csv)
    if result.last_val:
        log.info("final validation:\n%s", format_table(result.last_val))


def report_interrupted(run: RunDir, cfg: Config, result: FitResult, meta: dict[str, Any]) -> None:
    """train_report.json of a run that ended early (a signal, an abort), saying why. Best
    effort: on a full disk it may not be writable, which must not hide the real error."""
    try:
        finish_train_report(run, cfg, result, meta)
        write_manifest(run)
    except OSError as exc:
        log.warning("could not write the training report of the interrupted run: %s", exc)


def open_for_training(run: RunDir, cfg: Config, ctx: Distributed, resume: bool, allow_drift: bool,
                       allow_world_size_change: bool, drift: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint bundle to resume from (None for a fresh run), after the checks that
    refuse to start: an existing folder without --resume, config drift, another number of
    processes. Rank 0 checks (and repairs a damaged last.pt); the other ranks take its
    verdict, then read the checkpoint it settled on."""
    bundle, failure, outcome = None, None, None
    if ctx.is_main:
        try:
            if resume:
                bundle = resume_bundle(run, cfg, drift, allow_drift)
                check_world_size(bundle, ctx.world_size, allow_world_size_change, drift)
            elif run.root.exists() and any(run.root.iterdir()):
                raise DetpactError(f"Run folder {run.root} already exists. Add --resume to continue it, or pass "
                                   "another --run-id.")
            outcome = ("ok", bundle is not None)
        except DetpactError as exc:
            failure, outcome = exc, ("error", exc.message)
    status, detail = broadcast_from_main(ctx, outcome)
    if failure is not None:
        raise failure
    if status == "error":
        raise DetpactError(detail)
    if not ctx.is_main and detail:
        bundle = load_checkpoint(run.last_ckpt)
    return bundle
