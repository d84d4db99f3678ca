"""`detpact runs list` and `runs show`: what each run folder under the runs root is, read
from its small records (run_meta.json, status.json, train_report.json, val_metrics.jsonl,
config_resolved.yaml, manifest.json), never from a checkpoint, so a listing stays quick.

A run folder whose records are missing or unreadable is reported as `damaged`, with the
reasons, instead of stopping the listing; entries of the runs root that are not run
folders (files such as a registry database, hidden or unrelated folders) are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detpact.errors import DetpactError
from detpact.run.atomic import read_json
from detpact.run.contract import RUN_ID_PATTERN, RunDir, read_manifest, resolve_output_root
from detpact.run.metrics import read_jsonl

log = logging.getLogger(__name__)

HEADLINE = ("map50_95", "map50", "map75", "ar_max")
# A folder of the runs root is a run folder when it holds one of these (a run that died
# before writing its records still does: it is listed as damaged, not skipped).
RUN_MARKERS = ("reports", "checkpoints", "status.json", "manifest.json")


@dataclass
class RunSummary:
    """One row of `runs list`: the run's state and headline numbers, None where unknown."""

    run_id: str
    path: str
    status: str  # status.json's phase (train, eval, trained, done, failed, stopped, ...), or "damaged"
    task: str | None = None
    config_hash: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    duration_s: float | None = None
    steps: int | None = None
    epochs: int | None = None
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    problems: list[str] = field(default_factory=list)  # why the run is damaged


@dataclass
class RunRecords:
    """The parsed record files of one run (None: missing or unreadable)."""

    run: RunDir
    config: dict[str, Any] | None
    meta: dict[str, Any] | None
    status: dict[str, Any] | None
    report: dict[str, Any] | None
    val_history: list[dict[str, Any]]
    problems: list[str]


def read_records(run: RunDir) -> RunRecords:
    """Parse a run's record files, noting each one that is missing or damaged."""
    problems: list[str] = []

    def json_file(path: Path, required: bool) -> dict[str, Any] | None:
        data = read_json(path)
        if isinstance(data, dict):
            return data
        if path.exists():
            problems.append(f"{path.relative_to(run.root)} is unreadable")
        elif required:
            problems.append(f"{path.relative_to(run.root)} is missing")
        return None

    config = read_config(run)
    if config is None:
        problems.append(f"{run.config_resolved.relative_to(run.root)} is "
                        f"{'unreadable' if run.config_resolved.exists() else 'missing'}")
    meta = json_file(run.run_meta, required=True)
    status = json_file(run.status, required=True)
    report = json_file(run.train_report_json, required=bool(status and status.get("phase") == "done"))
    try:
        history = [record for record in read_jsonl(run.val_metrics) if isinstance(record, dict)]
    except (OSError, UnicodeDecodeError):
        history = []
        problems.append(f"{run.val_metrics.relative_to(run.root)} is unreadable")
    return RunRecords(run, config, meta, status, report, history, problems)


def read_config(run: RunDir) -> dict[str, Any] | None:
    """The resolved config of a run as plain data, or None when missing or unreadable."""
    try:
        config = yaml.safe_load(run.config_resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def summarize(records: RunRecords) -> RunSummary:
    """The `runs list` row of a run from its parsed records."""
    config, meta, status, report = records.config or {}, records.meta or {}, records.status or {}, records.report or {}
    counters = report.get("counters") or {}
    start, end = meta.get("start_time"), meta.get("end_time") or status.get("updated")
    best_metric, best_value, best_step = best_of(records)
    return RunSummary(
        run_id=records.run.root.name,
        path=str(records.run.root),
        status="damaged" if records.problems else str(status.get("phase", "unknown")),
        task=config.get("task"),
        config_hash=meta.get("config_hash") or report.get("config_hash"),
        start_time=start,
        end_time=meta.get("end_time"),
        duration_s=seconds_between(start, end),
        steps=counters.get("steps", status.get("step")),
        epochs=counters.get("epochs", status.get("epoch")),
        best_metric=best_metric,
        best_value=best_value,
        best_step=best_step,
        problems=list(records.problems),
    )


def best_of(records: RunRecords) -> tuple[str | None, float | None, int | None]:
    """(metric, value, step) of the run's best validation: train_report.json's, else (a run
    still training or stopped) the best line of val_metrics.jsonl under the config's rule."""
    best = (records.report or {}).get("best") or {}
    if best.get("metric") and best.get("step") is not None:
        return best["metric"], best.get("value", best.get("map50_95")), best["step"]
    checkpoint = ((records.config or {}).get("train") or {}).get("checkpoint") or {}
    metric, mode = checkpoint.get("best_metric", "map50_95"), checkpoint.get("best_mode", "max")
    scored = [r for r in records.val_history if isinstance(r.get(metric), (int, float))]
    if not scored:
        return metric, None, None
    pick = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
    return metric, pick[metric], pick.get("step")


def seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def is_run_folder(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def run_folders(root: Path) -> list[RunDir]:
    """The run folders directly under `root`; other entries are skipped (logged at debug level)."""
    if not root.is_dir():
        raise DetpactError(f"Runs root not found: {root}. Pass --root DIR, or set $DETPACT_OUTPUT_DIR to the "
                           "folder 'detpact train' writes runs into (default ./runs).")
    runs = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and RUN_ID_PATTERN.fullmatch(entry.name) and not entry.name.startswith(".") \
                and is_run_folder(entry):
            runs.append(RunDir(entry))
        else:
            log.debug("runs list: %s is not a run folder, skipped", entry)
    return runs


def list_runs(root: Path) -> list[RunSummary]:
    """A summary per run folder under `root`, oldest start first (folder time where unknown)."""
    summaries = [summarize(read_records(run)) for run in run_folders(root)]

    def started(summary: RunSummary) -> str:
        if summary.start_time:
            return summary.start_time
        return datetime.fromtimestamp(Path(summary.path).stat().st_mtime, UTC).isoformat(timespec="seconds")

    return sorted(summaries, key=lambda s: (started(s), s.run_id))


def artifact_status(run: RunDir) -> list[dict[str, Any]]:
    """Each artifact of the run against manifest.json by presence and size: ok, size differs,
    missing (recorded, gone) or unlisted (present, not recorded). `runs verify` checks sha256s."""
    manifest = read_manifest(run) or {}
    present = {p.relative_to(run.root).as_posix(): p.stat().st_size for p in run.artifacts()}
    rows = []
    for name in sorted(set(present) | set(manifest)):
        recorded = manifest.get(name) if isinstance(manifest.get(name), dict) else None
        size = present.get(name)
        if size is None:
            state = "missing"
        elif recorded is None:
            state = "unlisted"
        else:
            state = "ok" if recorded.get("size") == size else "size differs"
        rows.append({"path": name, "status": state, "size": size,
                     "sha256": recorded.get("sha256") if recorded else None})
    return rows


def show_run(run: RunDir) -> dict[str, Any]:
    """Everything `runs show` prints about one run, as plain data."""
    records = read_records(run)
    meta, report = records.meta or {}, records.report or {}
    final = report.get("final_val") or (records.val_history[-1] if records.val_history else {})
    dataset = meta.get("dataset") or report.get("dataset") or {}
    return {
        "summary": asdict(summarize(records)),
        "meta": {k: meta.get(k) for k in ("git_sha", "git_dirty", "seed", "device", "amp", "world_size", "host",
                                          "versions", "resumes")},
        "dataset": {**{k: dataset.get(k) for k in ("mode", "root", "num_train", "num_val", "class_names")},
                    "fingerprint": meta.get("dataset_fingerprint") or report.get("dataset_fingerprint")},
        "best": report.get("best"),
        "final": {k: final.get(k) for k in HEADLINE},
        "end_reason": report.get("end_reason") or (records.status or {}).get("end_reason"),
        "counters": report.get("counters"),
        "loss": report.get("loss"),
        "artifacts": artifact_status(run),
    }


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


STATUS_STYLES = {"done": "green", "trained": "green", "damaged": "bold red", "failed": "bold red",
                 "export_failed": "bold red", "stopped": "yellow"}


def console() -> Console:
    return Console(width=max(120, Console().width))


def print_runs(root: Path, summaries: list[RunSummary]) -> None:
    table = Table(title=f"runs in {escape(str(root))}", header_style="bold", box=None, title_justify="left")
    for column in ("run", "status", "task", "best", "steps", "duration", "config hash", "started"):
        table.add_column(column, justify="right" if column in ("best", "steps", "duration") else "left")
    for s in summaries:
        style = STATUS_STYLES.get(s.status, "")
        status = f"[{style}]{escape(s.status)}[/]" if style else escape(s.status)
        best = f"{s.best_metric} {fmt(s.best_value)}" if s.best_value is not None else "-"
        table.add_row(escape(s.run_id), status, escape(fmt(s.task)), best, fmt(s.steps), fmt_duration(s.duration_s),
                      fmt(s.config_hash)[:12], escape(fmt(s.start_time)))
    out = console()
    out.print(table)
    for s in summaries:
        if s.problems:
            out.print(f"[bold red]damaged[/] {escape(s.run_id)}: {escape('; '.join(s.problems))}")
    out.print(f"{len(summaries)} run(s)")


def print_show(shown: dict[str, Any]) -> None:
    s, meta, data = shown["summary"], shown["meta"], shown["dataset"]
    out = console()
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    versions = meta.get("versions") or {}
    rows = [
        ("run", s["run_id"]), ("folder", s["path"]), ("status", s["status"]), ("task", s["task"]),
        ("config hash", s["config_hash"]), ("started", s["start_time"]), ("ended", s["end_time"]),
        ("duration", fmt_duration(s["duration_s"])), ("end reason", shown["end_reason"]),
        ("git", f"{fmt(meta.get('git_sha'))}{' (dirty)' if meta.get('git_dirty') else ''}"),
        ("device", f"{fmt(meta.get('device'))}, amp {fmt(meta.get('amp'))}, world size {fmt(meta.get('world_size'))}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
        ("dataset", f"{fmt(data['mode'])} {fmt(data['root'])}: {fmt(data['num_train'])} train / "
                    f"{fmt(data['num_val'])} val images, classes {', '.join(data['class_names'] or []) or '-'}"),
        ("fingerprint", data["fingerprint"]),
        ("best", f"{s['best_metric']} {fmt(s['best_value'])} at step {fmt(s['best_step'])}"),
        ("final", ", ".join(f"{k} {fmt(v)}" for k, v in shown["final"].items())),
        ("counters", ", ".join(f"{k} {fmt(v, 1)}" for k, v in (shown["counters"] or {}).items())),
    ]
    for name, value in rows:
        facts.add_row(name, escape(fmt(value)))
    out.print(facts)
    if s["problems"]:
        out.print(f"[bold red]damaged[/]: {escape('; '.join(s['problems']))}")
    out.print("[bold]artifacts[/] (against manifest.json by size; `runs verify` checks the sha256s)")
    artifacts = Table(header_style="bold", box=None)
    for column in ("artifact", "status", "bytes", "sha256"):
        artifacts.add_column(column, justify="right" if column == "bytes" else "left")
    styles = {"ok": "green", "missing": "bold red", "size differs": "bold red", "unlisted": "yellow"}
    for row in shown["artifacts"]:
        artifacts.add_row(escape(row["path"]), f"[{styles[row['status']]}]{row['status']}[/]", fmt(row["size"]),
                          fmt(row["sha256"])[:12])
    out.print(artifacts if shown["artifacts"] else "  none")


def runs_root(args: argparse.Namespace) -> Path:
    """--root, else $DETPACT_OUTPUT_DIR, else ./runs (what `detpact train` writes into by default)."""
    return Path(args.root) if args.root else resolve_output_root(None, os.environ)


def open_run_arg(value: str, root: Path) -> RunDir:
    """A run named on the command line: a run folder, or a run id under the runs root. Unlike
    RunDir.existing, a damaged run (no config_resolved.yaml) opens, to be shown as such."""
    path = Path(value)
    if not path.is_dir() and RUN_ID_PATTERN.fullmatch(value):
        path = RunDir.for_run_id(root, value).root  # refuses '.', '..' and hidden names
    if not path.is_dir():
        raise DetpactError(f"Run not found: {value!r} is neither a run folder nor a run id under {root}. "
                           "See 'detpact runs list' (--root DIR for another runs root).")
    if not is_run_folder(path):
        raise DetpactError(f"{path} is not a detpact run folder (it has none of {', '.join(RUN_MARKERS)}). "
                           "Pass a folder printed by 'detpact train', or a run id from 'detpact runs list'.")
    return RunDir(path)


def add_parsers(runs_commands: argparse._SubParsersAction) -> None:
    listing = runs_commands.add_parser("list", help="one row per run: status, best metric, steps, duration, hash")
    listing.add_argument("--root", metavar="DIR", help="runs root (default: $DETPACT_OUTPUT_DIR, else ./runs)")
    listing.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    show = runs_commands.add_parser("show", help="one run: meta, config hash, dataset, metrics, counters, artifacts")
    show.add_argument("run_dir", metavar="RUN", help="run id under the runs root (e.g. exp01) or run folder")
    show.add_argument("--root", metavar="DIR", help="runs root for run ids (default: $DETPACT_OUTPUT_DIR, else ./runs)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    root = runs_root(args)
    if args.runs_command == "list":
        summaries = list_runs(root)
        if args.json:
            print(json.dumps([asdict(s) for s in summaries], indent=2))
        else:
            print_runs(root, summaries)
        return 0
    shown = show_run(open_run_arg(args.run_dir, root))
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print_show(shown)
    return 0


def main(argv: list[str]) -> int:
    """`detpact runs list|show|compare ...` on their own (detpact.launch): they read only small
    record files, so they skip importing torch and the rest of the CLI, which takes seconds."""
    from detpact.commands import runs_compare

    parser = argparse.ArgumentParser(prog="detpact runs")
    runs_commands = parser.add_subparsers(dest="runs_command", required=True)
    add_parsers(runs_commands)
    runs_compare.add_parser(runs_commands)
    args = parser.parse_args(argv)
    try:
        return runs_compare.run(args) if args.runs_command == "compare" else run(args)
    except DetpactError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # stdout was piped into a reader that exited (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
