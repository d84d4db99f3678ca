"""`detpact runs compare ID1 ID2 ...`: how runs differ in config and in results.

Config: every key of the resolved configs (reports/config_resolved.yaml, nested keys
dotted) whose value is not the same in all runs, each marked with whether it enters the
config hash. Metrics: best and final validation mAPs and a few counters, with the delta
of each run against the first. Curves: val mAP and train loss against the step, one line
per run, in one PNG (matplotlib, drawn off-screen).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from detpact.commands.runs_table import RunRecords, console, fmt, open_run_arg, read_records, runs_root, summarize
from detpact.config import HASH_EXCLUDED_KEYS
from detpact.errors import DetpactError
from detpact.run.atomic import atomic_open
from detpact.run.metrics import read_jsonl

MISSING = "<missing>"  # a key one run's config has and another's lacks (e.g. written by an older detpact)
CURVE_METRICS = ("map50_95", "map50", "map75", "ar_max")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of a nested mapping; lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def is_hashed(key: str) -> bool:
    """Whether a dotted config key enters the config hash (see config.load.HASH_EXCLUDED_KEYS)."""
    parts = tuple(key.split("."))
    return not any(parts[:len(excluded)] == excluded for excluded in HASH_EXCLUDED_KEYS)


def config_differences(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys whose value is not the same in every config, sorted: {"key", "values" (one per
    config, MISSING where absent), "hashed"}. Identical configs give an empty list."""
    flats = [flatten(config) for config in configs]
    differences = []
    for key in sorted(set().union(*flats)):
        values = [flat.get(key, MISSING) for flat in flats]
        if any(value != values[0] for value in values[1:]):
            differences.append({"key": key, "values": values, "hashed": is_hashed(key)})
    return differences


def run_metrics(records: RunRecords) -> dict[str, Any]:
    """A run's comparable numbers: best (highest over its validations) and final mAPs, the
    best.pt choice, steps, training time and the loss over the last steps."""
    history = records.val_history
    report = records.report or {}
    final = report.get("final_val") or (history[-1] if history else {})
    metrics: dict[str, Any] = {}
    for name in CURVE_METRICS:
        values = [r[name] for r in history if isinstance(r.get(name), (int, float))]
        metrics[f"best {name}"] = max(values) if values else None
        metrics[f"final {name}"] = final.get(name)
    summary = summarize(records)
    metrics[f"best.pt {summary.best_metric}"] = summary.best_value
    metrics["best.pt step"] = summary.best_step
    metrics["steps"] = summary.steps
    metrics["train seconds"] = (report.get("counters") or {}).get("train_seconds")
    metrics["loss, last 10 steps"] = (report.get("loss") or {}).get("last10")
    return metrics


def metric_differences(per_run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: {"metric", "values", "deltas"}; a delta is a run's value minus the
    first run's (None where either is unknown; the first run's own delta is None)."""
    rows = []
    for name in dict.fromkeys(key for metrics in per_run for key in metrics):
        values = [metrics.get(name) for metrics in per_run]
        first = values[0]
        deltas = [None] + [v - first if isinstance(v, (int, float)) and isinstance(first, (int, float)) else None
                           for v in values[1:]]
        rows.append({"metric": name, "values": values, "deltas": deltas})
    return rows


def curves(records: RunRecords) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a run: validation map50_95 and the training loss."""
    val = [(r["step"], r["map50_95"]) for r in records.val_history
           if isinstance(r.get("step"), int) and isinstance(r.get("map50_95"), (int, float))]
    try:
        train = read_jsonl(records.run.train_metrics)
    except (OSError, UnicodeDecodeError):
        train = []
    loss = [(r["step"], r["loss"]) for r in train
            if isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))]
    return {"val map50_95": val, "train loss": loss}


def plot_curves(names: list[str], series: list[dict[str, list[tuple[int, float]]]], out: Path) -> Path:
    """Overlay every run's curves (one panel per series) into a PNG at `out`, written atomically."""
    # The figure is drawn on an Agg canvas, without pyplot: no display, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = list(series[0])
    figure = Figure(figsize=(6 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for name, run_series in zip(names, series):
            points = run_series[panel]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        axes.set_title(panel)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    with atomic_open(out, "wb") as handle:
        handle.write(buffer.getvalue())
    return out


def default_plot_path(names: list[str]) -> Path:
    """runs_compare_<id1>_<id2>[_<id3>][_and_N_more].png in the current folder."""
    shown = [re.sub(r"[^A-Za-z0-9._-]", "_", name) for name in names[:3]]
    more = f"_and_{len(names) - 3}_more" if len(names) > 3 else ""
    return Path(f"runs_compare_{'_'.join(shown)}{more}.png")


def check_plot_path(out: Path) -> Path:
    if out.suffix.lower() != ".png":
        raise DetpactError(f"--out {out}: the plot is a PNG; name a file ending in .png, e.g. compare.png.")
    if out.is_dir() or not out.parent.is_dir():
        raise DetpactError(f"--out {out}: that is a folder, or its folder {out.parent} does not exist; "
                           "name a PNG file in an existing folder.")
    return out


def compare_runs(runs: list[RunRecords], out: Path) -> dict[str, Any]:
    """The comparison of runs (the first is the reference for deltas), with the curve plot at `out`."""
    names = [records.run.root.name for records in runs]
    configs = [records.config or {} for records in runs]
    summaries = [summarize(records) for records in runs]
    return {
        "runs": [{"run_id": s.run_id, "path": s.path, "status": s.status, "config_hash": s.config_hash,
                  "problems": s.problems} for s in summaries],
        "same_config_hash": len({s.config_hash for s in summaries}) == 1 and summaries[0].config_hash is not None,
        "config_differences": config_differences(configs),
        "metrics": metric_differences([run_metrics(records) for records in runs]),
        "plot": str(plot_curves(names, [curves(records) for records in runs], out)),
    }


def print_comparison(comparison: dict[str, Any]) -> None:
    out = console()
    names = [run["run_id"] for run in comparison["runs"]]
    for run in comparison["runs"]:
        if run["problems"]:
            out.print(f"[bold red]damaged[/] {escape(run['run_id'])}: {escape('; '.join(run['problems']))}")
    differences = comparison["config_differences"]
    same = " (same config hash)" if comparison["same_config_hash"] else ""
    out.print(f"[bold]config[/]: {len(differences)} key(s) differ{same}")
    config = Table(header_style="bold", box=None)
    for column in ("key", *names):
        config.add_column(escape(column), overflow="fold")
    for row in differences:
        key = row["key"] if row["hashed"] else f"{row['key']} (not hashed)"
        config.add_row(escape(key), *(escape(json.dumps(v) if v != MISSING else v) for v in row["values"]))
    if differences:
        out.print(config)
    out.print(f"[bold]metrics[/] (delta against {escape(names[0])})")
    metrics = Table(header_style="bold", box=None)
    for column in ("metric", *names):
        metrics.add_column(escape(column), justify="left" if column == "metric" else "right")
    for row in comparison["metrics"]:
        digits = 1 if row["metric"] == "train seconds" else 4
        cells = [fmt(value, digits) + (f" ({fmt_delta(delta, digits)})" if delta is not None else "")
                 for value, delta in zip(row["values"], row["deltas"])]
        metrics.add_row(escape(row["metric"]), *cells)
    out.print(metrics)
    out.print(f"curves: {escape(comparison['plot'])}")


def fmt_delta(delta: float, digits: int) -> str:
    return f"{delta:+d}" if isinstance(delta, int) else f"{delta:+.{digits}f}"


def add_parser(runs_commands: argparse._SubParsersAction) -> None:
    compare = runs_commands.add_parser(
        "compare", help="config differences key by key, metric deltas, and overlaid curves in a PNG")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN",
                         help="two or more run ids under the runs root (e.g. exp01 exp02) or run folders; the "
                              "first is the reference for deltas")
    compare.add_argument("--root", metavar="DIR", help="runs root for run ids (default: $DETPACT_OUTPUT_DIR, "
                                                      "else ./runs)")
    compare.add_argument("--out", metavar="PNG", help="curve plot to write (default: runs_compare_<ids>.png here)")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    if len(args.run_dirs) < 2:
        raise DetpactError("runs compare needs at least two runs, e.g. detpact runs compare exp01 exp02.")
    root = runs_root(args)
    runs = [open_run_arg(value, root) for value in args.run_dirs]
    folders = [os.path.realpath(run.root) for run in runs]
    if len(set(folders)) < len(folders):
        raise DetpactError(f"runs compare: a run is named twice ({', '.join(args.run_dirs)}); name each run once.")
    names = [run.root.name for run in runs]
    out = check_plot_path(Path(args.out) if args.out else default_plot_path(names))
    comparison = compare_runs([read_records(run) for run in runs], out)
    if args.json:
        print(json.dumps(comparison, indent=2))
    else:
        print_comparison(comparison)
    return 0
