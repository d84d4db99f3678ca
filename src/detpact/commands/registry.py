"""`detpact registry`: the model registry (docs/registry.md). List the registered runs,
find the best one of a task, show one, export them as CSV, evaluate every model of a
task on one dataset, and rebuild the database from the run folders.

The registry is recorded by training, evaluation and export (commands/record.py); these
commands read it, except `eval` (whose evaluations are recorded like any other) and
`rebuild`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detpact.commands.evaluate import evaluate
from detpact.commands.record import REGISTRY_ENV, registry_for_command
from detpact.commands.runs import CHECKPOINT_CHOICES
from detpact.errors import DetpactError
from detpact.run.contract import RunDir, resolve_output_root
from detpact.run.registry import MODES, Registry
from detpact.run.registry_index import rebuild, record_run

# The metrics `registry eval` tabulates (all of them with --json).
EVAL_COLUMNS = ("map50_95", "map50", "map75", "ar_max")


def add_parser(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser(
        "registry", help="the model registry: list, best, show, export-csv, eval and rebuild the registered runs")
    verbs = registry.add_subparsers(dest="registry_command", required=True, metavar="REGISTRY_COMMAND")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--registry", metavar="PATH",
                       help=f"the registry database (default: ${REGISTRY_ENV}, else registry.db in the runs root: "
                            "$DETPACT_OUTPUT_DIR, else runs)")

    listing = verbs.add_parser("list", parents=[where], help="the registered runs, oldest first")
    listing.add_argument("--task", help="only the runs of this task (the config's `task`)")
    listing.add_argument("--config-hash", metavar="H", help="only the runs whose config hash starts with H")
    listing.add_argument("--json", action="store_true", help="print the rows as JSON")

    best = verbs.add_parser("best", parents=[where], help="the run of a task with the best recorded metric")
    best.add_argument("--task", required=True, help="the task (the config's `task`)")
    best.add_argument("--metric", required=True, metavar="M",
                      help="a validation metric of best.pt, e.g. map50_95, map50, ar_max")
    best.add_argument("--mode", choices=MODES, default="max", help="highest (max, the default) or lowest (min)")
    best.add_argument("--json", action="store_true", help="print the run's row as JSON")

    show = verbs.add_parser("show", parents=[where], help="one run's row, evaluations and exports")
    show.add_argument("run", metavar="ID", help="run id (or run folder, when ids repeat across runs roots)")
    show.add_argument("--json", action="store_true", help="print the row and records as JSON")

    export_csv = verbs.add_parser("export-csv", parents=[where], help="write every registered run to a CSV file")
    export_csv.add_argument("file", metavar="FILE", help="the CSV file to write")

    evaluate_all = verbs.add_parser(
        "eval", parents=[where], help="evaluate every registered model of a task (its best.pt) and print one table")
    evaluate_all.add_argument("--task", required=True, help="the task (the config's `task`)")
    evaluate_all.add_argument("--data", metavar="CONFIG_OR_DATASET",
                              help="evaluate every model on this config's, dataset folder's or dataset YAML's "
                                   "validation split (default: each on its own)")
    evaluate_all.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best")
    evaluate_all.add_argument("--max-images", type=int, metavar="N", help="only the first N images of the split")
    evaluate_all.add_argument("--json", action="store_true", help="print the results as JSON")

    rebuild_cmd = verbs.add_parser(
        "rebuild", parents=[where], help="recreate the registry from the run folders (after it was lost or damaged)")
    rebuild_cmd.add_argument("--runs-root", action="append", metavar="DIR",
                             help="a folder of run folders to index (repeatable; default: $DETPACT_OUTPUT_DIR, "
                                  "else runs)")


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    path = registry_for_command(args.registry, environ)
    if args.registry_command == "rebuild":
        roots = [Path(root) for root in args.runs_root or [resolve_output_root(None, environ)]]
        count = rebuild(path, roots)
        print(f"rebuilt {path}: {count} runs from {', '.join(str(root) for root in roots)}")
        return 0
    if not path.is_file():
        raise DetpactError(f"No registry at {path}: it is created when a run trains. Point to it with --registry "
                           f"PATH or ${REGISTRY_ENV}, or index existing run folders with `detpact registry rebuild`.")
    registry = Registry(path)
    if args.registry_command == "list":
        rows = registry.runs(task=args.task, config_hash=args.config_hash)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_runs(rows)
    elif args.registry_command == "best":
        row = registry.best(args.task, args.metric, args.mode)
        print(json.dumps(row, indent=2) if args.json else
              f"{row['run_id']}  {args.metric} {row['metrics'][args.metric]!r}  "
              f"{(row['checkpoints'].get('best') or {}).get('path', '-')}")
    elif args.registry_command == "show":
        row = registry.run(args.run)
        records = registry.records(row["run_dir"])
        if args.json:
            print(json.dumps({"run": row, "records": records}, indent=2))
        else:
            print_run(row, records)
    elif args.registry_command == "export-csv":
        count = registry.export_csv(args.file)
        print(f"wrote {count} runs to {args.file}")
    elif args.registry_command == "eval":
        results = evaluate_task(registry, args.task, args.data, args.checkpoint, args.max_images, environ)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_evaluations(results, args.data)
        return 1 if any("error" in result for result in results) else 0
    return 0


def evaluate_task(registry: Registry, task: str, data: str | None, checkpoint: str, max_images: int | None,
                  environ: Mapping[str, str]) -> list[dict[str, Any]]:
    """Evaluate each registered run of `task` with `detpact eval` (on `data`, else on its
    own validation split); a run that cannot be evaluated gets an "error" instead of
    metrics. An evaluation on the run's own split is recorded, in this registry too."""
    rows = registry.runs(task=task)
    if not rows:
        raise DetpactError(f"No run of task {task!r} in the registry {registry.path}: see `detpact registry list`.")
    results = []
    for row in rows:
        result = {"run_id": row["run_id"], "run_dir": row["run_dir"], "status": row["status"],
                  "config_hash": row["config_hash"], "recorded": row["metrics"]}
        try:
            result["metrics"] = evaluate(row["run_dir"], checkpoint=checkpoint, data=data, max_images=max_images,
                                         environ=environ)
            # The run's own registry has recorded the evaluation; this one is told too.
            record_run(RunDir(Path(row["run_dir"])), registry.path)
        except DetpactError as exc:
            result["error"] = exc.message
        results.append(result)
    return results


def print_runs(rows: list[dict[str, Any]]) -> None:
    table = Table(header_style="bold", box=None)
    for column in ("run", "task", "status", "best", "steps", "config hash", "ended"):
        table.add_column(column, justify="right" if column == "steps" else "left")
    for row in rows:
        best = f"{row['best_metric']} {_number(row['best_value'])}" if row["best_metric"] else "-"
        table.add_row(escape(row["run_id"]), escape(row["task"] or "-"), row["status"], best,
                      _number(row["steps"]), (row["config_hash"] or "-")[:12], row["ended"] or "-")
    _console().print(table)
    print(f"{len(rows)} runs")


def print_run(row: dict[str, Any], records: list[dict[str, Any]]) -> None:
    out = _console()
    for key, value in row.items():
        if key in ("metrics", "checkpoints", "versions"):
            continue
        out.print(f"{key:20} {escape(str(value))}")
    metrics = {k: v for k, v in row["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.print(f"{'metrics':20} {escape(', '.join(f'{k} {_number(v)}' for k, v in metrics.items()) or '-')}")
    for name, entry in row["checkpoints"].items():
        out.print(f"{name + '.pt':20} {escape(entry['path'])} (sha256 {entry['sha256'][:16]})")
    out.print(f"{'versions':20} {escape(', '.join(f'{k} {v}' for k, v in row['versions'].items()))}")
    if records:
        table = Table(header_style="bold", box=None, title="evaluations and exports", title_justify="left")
        for column in ("kind", "name", "time", "map50_95", "detail"):
            table.add_column(column)
        for record in records:
            metrics = record["metrics"]
            score = metrics.get("map50_95", metrics.get("onnx"))  # an export's: the ONNX model's mAP
            detail = record["details"].get("verdict") or f"{record['details'].get('num_images')} images"
            table.add_row(record["kind"], escape(record["name"]), record["time"] or "-", _number(score),
                          escape(str(detail)))
        out.print(table)


def print_evaluations(results: list[dict[str, Any]], data: str | None) -> None:
    table = Table(header_style="bold", box=None, title_justify="left",
                  title=f"evaluated on {escape(data) if data else 'each run’s own validation split'}")
    for column in ("run", "status", "config hash", "recorded map50_95", *EVAL_COLUMNS, "images"):
        table.add_column(column, justify="left" if column in ("run", "status", "config hash") else "right")
    for result in results:
        metrics = result.get("metrics") or {}
        cells = [_number(metrics.get(c)) for c in EVAL_COLUMNS] if metrics else [
            "[bold red]error[/]", *[""] * (len(EVAL_COLUMNS) - 1)]
        table.add_row(escape(result["run_id"]), result["status"], (result["config_hash"] or "-")[:12],
                      _number(result["recorded"].get("map50_95")), *cells, _number(metrics.get("num_images")))
    out = _console()
    out.print(table)
    for result in results:
        if "error" in result:
            out.print(f"[bold red]{escape(result['run_id'])}:[/] {escape(result['error'])}")


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _console() -> Console:
    return Console(width=max(120, Console().width))
