"""A run folder as registry rows: the run's row and its evaluation and export records.

Every value comes from the folder's own files (run_meta.json, train_report.json,
val_metrics.jsonl, status.json, manifest.json, config_resolved.yaml, the eval reports
and the export's files), never from the process that recorded it: recording a run
after training and re-indexing its folder later (`registry rebuild`) give the same rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from detpact.errors import DetpactError
from detpact.run.atomic import read_json
from detpact.run.contract import RunDir, read_manifest, sha256_file
from detpact.run.registry import Registry

log = logging.getLogger(__name__)

# status.json's phase -> the run's registry status.
STATUS_OF_PHASE = {"done": "finished", "stopped": "stopped", "failed": "failed", "export_failed": "export_failed"}
EVAL_PREFIX = "eval_"


def run_entry(run: RunDir) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The registry row of `run` and its records; None for a folder that is no started run
    (no run_meta.json: training was refused before it began)."""
    meta = read_json(run.run_meta)
    if not isinstance(meta, dict):
        return None
    report = read_json(run.train_report_json) or {}
    status = read_json(run.status) or {}
    best = report.get("best") or {}
    manifest = read_manifest(run) or {}
    row = {
        "run_dir": str(run.root.resolve()),
        "run_id": run.root.name,
        "task": resolved_config(run).get("task"),
        # A phase other than these (train, eval, export) means the run is going on, or its
        # process was killed; `runs verify` tells them apart.
        "status": STATUS_OF_PHASE.get(status.get("phase"), "running"),
        "end_reason": report.get("end_reason") or status.get("end_reason"),
        "config_hash": meta.get("config_hash"),
        "dataset_fingerprint": meta.get("dataset_fingerprint"),
        "best_metric": best.get("metric"),
        "best_mode": best.get("mode"),
        "best_value": best.get("value"),
        "best_step": best.get("step"),
        "steps": (report.get("counters") or {}).get("steps", status.get("step")),
        "metrics": _validation_at(run, best.get("step")),
        "checkpoints": {name: _file_record(run, path, manifest)
                        for name, path in (("best", run.best_ckpt), ("last", run.last_ckpt)) if path.is_file()},
        "versions": meta.get("versions") or {},
        "git_sha": meta.get("git_sha"),
        "git_dirty": meta.get("git_dirty"),
        "started": meta.get("start_time"),
        "ended": meta.get("end_time"),
    }
    return row, [*_eval_records(run), *_export_records(run, manifest)]


def record_run(run: RunDir, registry_path: Path) -> bool:
    """Index `run` into the registry at `registry_path`. Never raises for a registry or
    run-folder problem: a registry that cannot be written must not fail the training,
    evaluation or export that is recording, so it is logged as a warning. Returns
    whether the run was recorded."""
    try:
        entry = run_entry(run)
        if entry is None:
            return False
        Registry(registry_path).put_run(*entry)
    except Exception as exc:  # whatever it is, the command that records goes on
        message = exc.message if isinstance(exc, DetpactError) else f"{type(exc).__name__}: {exc}"
        log.warning("run %s not recorded in the registry %s: %s", run.root.name, registry_path, message)
        return False
    log.debug("run %s recorded in the registry %s", run.root.name, registry_path)
    return True


def run_folders(roots: Iterable[Path]) -> Iterator[RunDir]:
    """The run folders (holding reports/run_meta.json) directly under each runs root."""
    for root in roots:
        if not Path(root).is_dir():
            raise DetpactError(f"Runs root {root} not found: pass the folder holding the run folders "
                               "(--runs-root DIR, run.output_root or $DETPACT_OUTPUT_DIR).")
        for folder in sorted(Path(root).iterdir()):
            run = RunDir(folder)
            if folder.is_dir() and run.run_meta.is_file():
                yield run


def rebuild(registry_path: Path, roots: Iterable[Path]) -> int:
    """Recreate the registry from the run folders under `roots`; returns the run count."""
    entries = [entry for entry in map(run_entry, run_folders(roots)) if entry is not None]
    return Registry(registry_path).rebuild(entries)


def resolved_config(run: RunDir) -> dict[str, Any]:
    """The run's config_resolved.yaml as plain data ({} when unreadable): what the registry
    needs of it (task, registry.path) without validating it against today's schema."""
    try:
        config = yaml.safe_load(run.config_resolved.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _validation_at(run: RunDir, step: int | None) -> dict[str, Any]:
    """The metrics of the validation at `step` (the one that wrote best.pt), from val_metrics.jsonl."""
    if step is None or step < 0 or not run.val_metrics.is_file():
        return {}
    found: dict[str, Any] = {}
    for line in run.val_metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if isinstance(row, dict) and row.get("step") == step:
            found = row  # the last one: a resumed run may have validated the same step again
    return {key: value for key, value in found.items() if key not in ("step", "epoch")}  # best_step has them


def _file_record(run: RunDir, path: Path, manifest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Path, sha256 and size of an artifact: from manifest.json, which records each file as it
    is written (a large checkpoint is not hashed again), else hashed now."""
    entry = manifest.get(path.relative_to(run.root).as_posix()) or {}
    if not entry.get("sha256"):
        entry = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"path": str(path.resolve()), "sha256": entry["sha256"], "size": entry.get("size")}


def _eval_records(run: RunDir) -> list[dict[str, Any]]:
    """One record per `detpact eval` report the run keeps (reports/eval_<name>.json: the
    latest evaluation of each checkpoint and of the exported model on the run's own data)."""
    records = []
    for path in run.eval_reports():
        report = read_json(path)
        if not isinstance(report, dict):
            continue
        name = path.stem[len(EVAL_PREFIX):]
        evaluated = {"best": run.best_ckpt, "last": run.last_ckpt, "onnx": run.onnx_model}.get(name)
        records.append({
            "kind": "eval", "name": name, "time": report.get("time"),
            "config_hash": report.get("config_hash"), "dataset_fingerprint": report.get("dataset_fingerprint"),
            "path": str(evaluated.resolve()) if evaluated else None, "sha256": None,
            "metrics": report.get("metrics") or {},
            "details": {key: report.get(key) for key in ("source", "step", "split", "num_images", "dataset_root")},
        })
    return records


def _export_records(run: RunDir, manifest: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The exported ONNX model, with its parity verdict and its ONNX-vs-PyTorch mAP."""
    if not run.onnx_model.is_file():
        return []
    meta, parity = read_json(run.onnx_meta) or {}, read_json(run.onnx_parity) or {}
    model = _file_record(run, run.onnx_model, manifest)
    modified = datetime.fromtimestamp(run.onnx_model.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return [{
        "kind": "export", "name": "onnx", "time": modified, "config_hash": meta.get("config_hash"),
        "dataset_fingerprint": None, "path": model["path"], "sha256": model["sha256"],
        "metrics": parity.get("map") or {},
        "details": {"verdict": parity.get("verdict"), "opset": meta.get("opset"), "exporter": meta.get("exporter"),
                    "checkpoint": meta.get("checkpoint"), "in_graph_postprocessing": parity.get("in_graph_postprocessing"),
                    "size": model["size"]},
    }]
