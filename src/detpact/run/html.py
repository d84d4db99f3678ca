"""reports/report.html: one self-contained page a person opens to see what a run did.

Everything is inside the file: the plots as data: URIs, the styles inline, no script,
no font, no link to anything outside it, so it opens from disk with no server and no
network. Every text taken from the run (names, paths, config values) goes through
html.escape. The page is rebuilt from the run folder's files alone (`render_report`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from detpact.run.atomic import atomic_write_text, read_json
from detpact.run.contract import PLOT_NAMES, RunDir
from detpact.run.metrics import read_jsonl

PLOT_TITLES = {
    "loss": "Training loss and its components", "lr": "Learning rate", "grad_norm": "Gradient norm",
    "val_map": "Validation mAP", "pr_curves": "Precision-recall per class", "confusion": "Confusion matrix",
    "val_images": "Validation images: predictions and ground truth",
}  # fmt: skip
WIDE_PLOTS = ("loss", "val_images")  # the others take half the page's width
HEADLINE = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large", "ar_max")
MAX_HISTORY_ROWS = 60  # the validation history table shows the last ones (the plot shows all)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 16px 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px/1.4 ui-monospace, monospace; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: flex-start; }
figure { margin: 8px 0 16px; flex: 1 1 100%; } figure.half { flex: 1 1 calc(50% - 16px); max-width: calc(50% - 8px); }
figure img { max-width: 100%; border: 1px solid #eee; } .plots p { flex: 1 1 100%; margin: 4px 0; }
figcaption { color: #555; font-size: 13px; } .note { color: #777; font-style: italic; }
.pass { color: #186a1f; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
nav a { margin-right: 12px; }
"""


def write_report_html(run: RunDir, notes: Mapping[str, str] | None = None) -> str:
    """Render the page from the run folder and write it to reports/report.html; returns it.
    `notes`: a line per plot name to show under that plot (where its data came from, or
    why it is missing)."""
    page = render_report(run, notes or {})
    atomic_write_text(run.report_html, page)
    return page


def render_report(run: RunDir, notes: Mapping[str, str]) -> str:
    meta = read_json(run.run_meta) or {}
    report = read_json(run.train_report_json) or {}
    status = read_json(run.status) or {}
    val_rows = read_jsonl(run.val_metrics)
    sections = [
        ("summary", "Summary", _summary(run, meta, report, status)),
        ("metrics", "Metrics", _metrics(report, val_rows, run)),
        ("plots", "Plots", _plots(run, notes)),
        ("parity", "ONNX parity", _parity(read_json(run.onnx_parity))),
        *([("scenarios", "Scenarios (detpact test)", _scenarios(read_json(run.scenarios_report)))]
          if run.scenarios_report.is_file() else []),
        ("dataset", "Dataset", _dataset(meta.get("dataset") or report.get("dataset"))),
        ("meta", "Run meta", _key_values(meta, skip=("dataset",))),
        ("artifacts", "Artifacts (manifest.json)", _artifacts(read_json(run.manifest))),
        ("config", "Resolved config", _config(run)),
    ]
    nav = " ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    body = "\n".join(f'<section id="{key}"><h2>{escape(title)}</h2>\n{html}</section>' for key, title, html in sections)
    title = f"detpact run {run.root.name}"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")


def _summary(run: RunDir, meta: Mapping, report: Mapping, status: Mapping) -> str:
    best, counters = report.get("best") or {}, report.get("counters") or {}
    rows = {
        "run folder": str(run.root), "status": status.get("phase"), "end reason": report.get("end_reason"),
        "best": (f"{best.get('metric')} = {_fmt(best.get('value'))} at step {best.get('step')} "
                 f"(epoch {best.get('epoch')})") if best else None,
        "steps / epochs": f"{counters.get('steps')} / {counters.get('epochs')}" if counters else None,
        "images seen": counters.get("samples_seen"), "parameters": counters.get("num_params"),
        "training time": f"{counters['train_seconds']:.1f} s" if "train_seconds" in counters else None,
        "non-finite steps skipped": counters.get("nonfinite_skipped"),
        "config hash": meta.get("config_hash"), "dataset fingerprint": meta.get("dataset_fingerprint"),
        "started / ended": f"{meta.get('start_time')} / {meta.get('end_time')}" if meta else None,
    }
    return _key_values({k: v for k, v in rows.items() if v is not None})


def _metrics(report: Mapping, val_rows: Sequence[Mapping], run: RunDir) -> str:
    parts = []
    evaluations = [(f"validation at step {r.get('step')}", r) for r in val_rows[-1:]]
    evaluations += [(f"{path.name} ({(read_json(path) or {}).get('time', '')})", (read_json(path) or {}).get("metrics"))
                    for path in run.eval_reports()]
    evaluations = [(name, m) for name, m in evaluations if isinstance(m, Mapping)]
    if evaluations:
        parts.append("<h3>Headline (COCO box metrics)</h3>")
        parts.append(_table(["source", *HEADLINE], [[name, *(m.get(k) for k in HEADLINE)] for name, m in evaluations]))
        name, latest = evaluations[-1]
        per_class = latest.get("per_class") or {}
        op = latest.get("operating_point") or {}
        op_class = op.get("per_class") or {}
        if per_class:
            parts.append(f"<h3>Per class ({escape(name)})</h3>")
            header = ["class", "AP .50:.95", "AP .50", "precision", "recall", "F1"]
            parts.append(_table(header, [
                [cls, ap, (latest.get("per_class_ap50") or {}).get(cls),
                 *((op_class.get(cls) or {}).get(k) for k in ("precision", "recall", "f1"))]
                for cls, ap in per_class.items()]))
        if op:
            parts.append(f"<p>Operating point: score &ge; {escape(str(op.get('score_threshold')))}, IoU &ge; "
                         f"{escape(str(op.get('iou_threshold')))}: precision {_fmt(op.get('precision'))}, recall "
                         f"{_fmt(op.get('recall'))}, F1 {_fmt(op.get('f1'))} (TP {op.get('tp')}, FP {op.get('fp')}, "
                         f"FN {op.get('fn')}).</p>")
    history = val_rows[-MAX_HISTORY_ROWS:]
    if history:
        parts.append("<h3>Validation history</h3>")
        if len(val_rows) > len(history):
            parts.append(f'<p class="note">the last {len(history)} of {len(val_rows)} validations</p>')
        parts.append(_table(["step", "epoch", "map50_95", "map50", "map75"],
                            [[r.get(k) for k in ("step", "epoch", "map50_95", "map50", "map75")] for r in history]))
    loss = report.get("loss") or {}
    if loss:
        parts.append(f"<p>Training loss: first 10 steps {_fmt(loss.get('first10'))}, last 10 steps "
                     f"{_fmt(loss.get('last10'))}, min {_fmt(loss.get('min'))}.</p>")
    return "\n".join(parts) or '<p class="note">no metrics recorded yet</p>'


def _plots(run: RunDir, notes: Mapping[str, str]) -> str:
    parts = []
    for name in PLOT_NAMES:
        path, title, note = run.plot(name), PLOT_TITLES[name], notes.get(name)
        caption = escape(title) + (f" &middot; {escape(note)}" if note else "")
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            width = "" if name in WIDE_PLOTS else ' class="half"'
            parts.append(f'<figure id="plot-{name}"{width}><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{caption}</figcaption></figure>")
        else:
            parts.append(f'<p class="note">{caption}: not drawn</p>')
    return '<div class="plots">\n' + "\n".join(parts) + "\n</div>"


def _parity(parity: Mapping | None) -> str:
    if not parity:
        return '<p class="note">no ONNX export yet (reports/onnx_parity.json is absent)</p>'
    verdict = str(parity.get("verdict"))
    rows: dict[str, Any] = {"verdict": None, "policy": parity.get("policy"), "images": parity.get("num_images"),
                            "model": parity.get("onnx")}
    checks = parity.get("checks") or []
    for output in ("boxes", "scores"):
        diffs = [c["outputs"][output]["max_abs"] for c in checks if output in (c.get("outputs") or {})]
        if diffs:
            rows[f"max |diff| {output}"] = max(diffs)
    if isinstance(parity.get("map"), Mapping):
        rows["mAP diff (ONNX - PyTorch)"] = parity["map"].get("diff")
    css = "pass" if verdict == "pass" else "fail"
    table = _key_values({k: v for k, v in rows.items() if k != "verdict"})
    return f'<p>Verdict: <span class="{css}">{escape(verdict.upper())}</span></p>\n{table}'


def _scenarios(report: Mapping | None) -> str:
    """reports/scenarios.json as a table: each scenario's mAP and its change from clean."""
    if not isinstance(report, Mapping) or not isinstance(report.get("clean"), Mapping):
        return '<p class="note">reports/scenarios.json is unreadable</p>'
    rows = [report["clean"], *(r for r in report.get("scenarios") or [] if isinstance(r, Mapping))]
    parts = [f"<p>{escape(str(report.get('settings')))} on {escape(str(report.get('num_images')))} validation "
             f"images ({escape(str(report.get('time')))}); change = scenario &minus; clean.</p>",
             _table(["scenario", "images", "map50_95", "map50", "change map50_95", "change map50"], [
                 [r.get("name"), r.get("num_images"), r.get("map50_95"), r.get("map50"),
                  *(None if r.get(k) is None else 0.0 - r[k] for k in ("drop_map50_95", "drop_map50"))]
                 for r in rows])]
    summary = report.get("summary")
    if isinstance(summary, Mapping):
        parts.append(f"<p>Robustness: mPC {_fmt(summary.get('mpc'))} (mean map50_95 over "
                     f"{escape(str(summary.get('corruption_rows')))} corruption rows), rPC {_fmt(summary.get('rpc'))} "
                     "(mPC / clean).</p>")
    skipped = report.get("skipped") or []
    if skipped:
        parts.append(f'<p class="note">skipped: {escape(", ".join(str(r.get("name")) for r in skipped))} '
                     f'({escape(str(skipped[0].get("reason")))})</p>')
    return "\n".join(parts)


def _dataset(data: Mapping | None) -> str:
    if not data:
        return '<p class="note">no dataset summary (reports/run_meta.json is absent)</p>'
    rows = dict(data)
    names = rows.pop("class_names", None) or []
    rows["classes"] = f"{len(names)}: {', '.join(map(str, names))}"
    return _key_values(rows)


def _artifacts(manifest: Mapping | None) -> str:
    files = (manifest or {}).get("files")
    if not isinstance(files, Mapping):
        return '<p class="note">no manifest.json</p>'
    rows = [[name, entry.get("size"), entry.get("sha256")] for name, entry in files.items() if isinstance(entry, Mapping)]
    return (f"<p>As recorded at {escape(str(manifest.get('updated')))} "
            f"(<code>detpact runs verify</code> checks them).</p>\n" + _table(["file", "bytes", "sha256"], rows))


def _config(run: RunDir) -> str:
    try:
        text = run.config_resolved.read_text(encoding="utf-8")
    except OSError:
        return '<p class="note">no reports/config_resolved.yaml</p>'
    return f"<pre>{escape(text)}</pre>"


def _key_values(values: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    rows = [[key, value] for key, value in values.items() if key not in set(skip)]
    return _table(["", ""], rows, show_header=False) if rows else '<p class="note">nothing recorded</p>'


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], show_header: bool = True) -> str:
    lines = ["<table>"]
    if show_header:
        lines.append("<tr>" + "".join(f"<th>{escape(str(c))}</th>" for c in columns) + "</tr>")
    for row in rows:
        cells = []
        for value in row:
            css = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            cells.append(f"<td{css}>{escape(_fmt(value))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
