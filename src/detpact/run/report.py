"""train_report.json / .md: what a finished run achieved, in one place."""

from __future__ import annotations

from typing import Any

from detpact.run.atomic import atomic_write_json, atomic_write_text
from detpact.run.contract import RunDir
from detpact.run.metrics import read_jsonl

HEADLINE = ("map50_95", "map50", "map75")


def loss_diagnostics(losses: list[float]) -> dict[str, Any]:
    """First/last/min of the per-step training loss (first and last averaged over 10 steps)."""
    if not losses:
        return {"first10": None, "last10": None, "min": None}
    first, last = losses[:10], losses[-10:]
    return {"first10": sum(first) / len(first), "last10": sum(last) / len(last), "min": min(losses)}


def write_train_report(run: RunDir, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the report from `summary` (counters, data, best) plus the run's metric logs on disk,
    which cover every session of a resumed run."""
    losses = [r["loss"] for r in read_jsonl(run.train_metrics) if r.get("loss") is not None]
    history = [
        {"step": r["step"], "epoch": r["epoch"], **{k: r.get(k) for k in HEADLINE}}
        for r in read_jsonl(run.val_metrics)
    ]
    report = {**summary, "loss": loss_diagnostics(losses), "val_history": history}
    atomic_write_json(run.train_report_json, report)
    atomic_write_text(run.train_report_md, _markdown(report))
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(report: dict[str, Any]) -> str:
    best, data, counters = report["best"], report["dataset"], report["counters"]
    lines = [
        f"# Training report: {report['run_id']}",
        "",
        f"- config hash: `{report['config_hash']}`",
        f"- dataset: {data['mode']} ({data['root']}), fingerprint `{report['dataset_fingerprint'][:16]}`, "
        f"{data['num_train']} train / {data['num_val']} val images, classes: {', '.join(data['class_names'])}",
        f"- best val {best.get('metric', 'map50_95')}: {_fmt(best.get('value', best['map50_95']))} at step "
        f"{best['step']} (epoch {best['epoch']}); map50_95 there: {_fmt(best['map50_95'])}",
        f"- steps: {counters['steps']}, epochs: {counters['epochs']}, images seen: {counters['samples_seen']}, "
        f"non-finite steps skipped: {counters['nonfinite_skipped']}",
        f"- training time: {counters['train_seconds']:.1f} s ({counters['samples_per_s']:.1f} img/s)",
        f"- loss: first 10 steps {_fmt(report['loss']['first10'])}, last 10 steps {_fmt(report['loss']['last10'])}, "
        f"min {_fmt(report['loss']['min'])}",
        "",
        "## Validation history",
        "",
        "| step | epoch | map50_95 | map50 | map75 |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {h['step']} | {h['epoch']} | {_fmt(h['map50_95'])} | {_fmt(h['map50'])} | {_fmt(h['map75'])} |"
        for h in report["val_history"]
    ]
    final = report.get("final_val") or {}
    per_class = final.get("per_class") or {}
    if per_class:
        lines += ["", "## Final per-class AP (map50_95)", "", "| class | AP | AP50 |", "|---|---:|---:|"]
        lines += [
            f"| {name} | {_fmt(ap)} | {_fmt(final['per_class_ap50'].get(name))} |" for name, ap in per_class.items()
        ]
    return "\n".join(lines) + "\n"
