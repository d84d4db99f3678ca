"""`detpact smoke`: load a checkpoint on each device, detect on one image, and check that
every device finds what the CPU finds (docs/smoke.md).

The CPU result is the reference: it runs first, whether or not it was asked for. A device
that is not there is skipped with the reason; one whose load or inference raises fails
with the error, and the other devices still run.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor

from detpact.commands.runs import CHECKPOINT_CHOICES, checkpoint_path, open_run
from detpact.data.formats import IMAGE_SUFFIXES, image_size
from detpact.engine.evaluate import Backend, TorchBackend
from detpact.errors import DetpactError
from detpact.inference.predictor import load_detector, predict_images
from detpact.models.boxes import box_iou
from detpact.models.postprocess import Detections
from detpact.run.atomic import atomic_write_json

REFERENCE = "cpu"
DEVICE_NAME = re.compile(r"cpu|mps|cuda(:\d+)?")
# Two detections are the same object when they have the same class and overlap this much.
MATCH_IOU = 0.5


def add_parser(commands: argparse._SubParsersAction) -> None:
    smoke = commands.add_parser(
        "smoke", help="load a checkpoint on each device, detect on one image, compare every device with the CPU")
    smoke.add_argument("source", metavar="CHECKPOINT_OR_RUN",
                       help="a checkpoint (.pt) or a run folder (its checkpoints/best.pt, see --checkpoint)")
    smoke.add_argument("--image", required=True, metavar="IMG", help="the image to detect on")
    smoke.add_argument("--devices", default="cpu,cuda", metavar="D,D,...",
                       help="devices to try: cpu, cuda, cuda:N, mps (default cpu,cuda)")
    smoke.add_argument("--output-json", required=True, metavar="FILE", help="the report to write")
    smoke.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                       help="with a run folder: which checkpoint (default best)")
    smoke.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    smoke.add_argument("--box-tolerance", type=float, default=1.0, metavar="PX",
                       help="largest box difference from the CPU, in pixels, that passes (default 1)")
    smoke.add_argument("--score-tolerance", type=float, default=0.01,
                       help="largest score difference from the CPU that passes (default 0.01)")


def run(args: argparse.Namespace) -> int:
    report = smoke(args.source, args.image, devices=parse_devices(args.devices), output_json=args.output_json,
                   checkpoint=args.checkpoint, score_threshold=args.conf,
                   tolerance={"box_px": args.box_tolerance, "score": args.score_tolerance})
    print_smoke(report, args.output_json)
    return 0 if report["passed"] else 1


def parse_devices(text: str) -> list[str]:
    """'cpu,cuda' -> ['cpu', 'cuda'] (duplicates dropped); DetpactError on an unknown name."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    wrong = [name for name in names if not DEVICE_NAME.fullmatch(name)]
    if wrong or not names:
        raise DetpactError(f"--devices {text!r}: {', '.join(map(repr, wrong)) or 'no device'} is not a device. "
                           "Name devices separated by commas, from cpu, cuda, cuda:N and mps, e.g. --devices cpu,cuda.")
    return list(dict.fromkeys(names))


def smoke(source: str | Path, image: str | Path, *, devices: Sequence[str], output_json: str | Path,
          checkpoint: str = "best", score_threshold: float = 0.25, tolerance: Mapping[str, float] | None = None,
          environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run `source`'s detector on `image` on every device and write the report to `output_json`.

    Returns {"checkpoint", "image", "config_hash", "torch_version", "reference", "tolerance",
    "score_threshold", "devices": {name: entry}, "passed"}; an entry is {"status": pass | fail |
    skip, "reason"?, "amp", "load_seconds", "inference_seconds", "detections", "max_box_diff",
    "max_score_diff", "unmatched"} (docs/smoke.md). The CPU runs first, as the reference.
    """
    tolerance = {"box_px": 1.0, "score": 0.01, **(tolerance or {})}
    if not 0.0 <= score_threshold <= 1.0:
        raise DetpactError(f"--conf must be between 0 and 1, got {score_threshold}.")
    ckpt = resolve_checkpoint(source, checkpoint, environ)
    image = check_image(Path(image))
    names = list(dict.fromkeys([REFERENCE, *devices]))
    report: dict[str, Any] = {"checkpoint": str(ckpt), "image": str(image), "config_hash": None,
                              "torch_version": torch.__version__, "reference": REFERENCE, "tolerance": tolerance,
                              "score_threshold": score_threshold, "devices": {}, "passed": False}
    reference: list[dict] | None = None
    for name in names:
        entry, found, config_hash = _try_device(name, ckpt, image, score_threshold)
        report["config_hash"] = report["config_hash"] or config_hash
        if name not in devices:
            entry.setdefault("reason", "the reference for the comparison (not in --devices)")
        if name == REFERENCE:
            reference = found
        elif found is not None and reference is not None:
            _judge(entry, compare_detections(reference, found), tolerance, score_threshold)
        report["devices"][name] = entry
    report["passed"] = all(entry["status"] != "fail" for entry in report["devices"].values())
    atomic_write_json(Path(output_json), report)
    return report


def resolve_checkpoint(source: str | Path, which: str, environ: Mapping[str, str] | None) -> Path:
    """A .pt file as it is; a run folder (or run id) -> its `which` checkpoint."""
    path = Path(source)
    if path.suffix == ".pt":
        if not path.is_file():
            raise DetpactError(f"Checkpoint not found: {path}. Pass a checkpoint written by 'detpact train' "
                               "(e.g. runs/exp01/checkpoints/best.pt) or the run folder itself.")
        return path
    return checkpoint_path(open_run(source, environ), which)


def check_image(path: Path) -> Path:
    if not path.is_file():
        raise DetpactError(f"Image not found: {path}. Pass an image file ({', '.join(IMAGE_SUFFIXES)}) with --image.")
    image_size(path)  # DetpactError, naming the file, when it is not a readable image
    return path


def unavailable_reason(name: str) -> str | None:
    """Why device `name` cannot run here, or None when it can."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            if torch.version.cuda is None and torch.version.hip is None:
                return f"no CUDA device (torch {torch.__version__} is a CPU build)"
            return "CUDA not available (no device visible to this torch build)"
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"{name} not present ({torch.cuda.device_count()} CUDA devices)"
    if name == "mps" and not torch.backends.mps.is_available():
        return "MPS not available" if torch.backends.mps.is_built() else \
            f"MPS not available (torch {torch.__version__} is built without it)"
    return None


def amp_on(device: torch.device, amp: str) -> str:
    """The run's autocast precision, as trained; float16 autocast is a CUDA setting
    (runtime.check_amp), so an fp16 run's CPU/MPS pass runs in bfloat16."""
    return "bf16" if amp == "fp16" and device.type != "cuda" else amp


class TimedBackend:
    """A backend that times its last call, waiting for the device so the time is the work's."""

    def __init__(self, backend: Backend, device: torch.device):
        self.backend, self.device, self.seconds = backend, device, 0.0

    def __call__(self, images: Tensor) -> list[Detections]:
        start = time.perf_counter()
        detections = self.backend(images)
        _synchronize(self.device)
        self.seconds = time.perf_counter() - start
        return detections


def _try_device(name: str, ckpt: Path, image: Path, score_threshold: float
                ) -> tuple[dict[str, Any], list[dict] | None, str | None]:
    """(report entry, detections or None, the checkpoint's config hash or None) of one device."""
    entry: dict[str, Any] = {"status": "skip", "amp": None, "load_seconds": None, "inference_seconds": None,
                             "detections": None, "max_box_diff": None, "max_score_diff": None, "unmatched": None}
    reason = unavailable_reason(name)
    if reason is not None:
        return {**entry, "reason": reason}, None, None
    device = torch.device(name)
    config_hash = None
    try:
        start = time.perf_counter()
        loaded = load_detector(ckpt, device)
        _synchronize(device)
        entry["load_seconds"] = time.perf_counter() - start
        config_hash = loaded.bundle["config_hash"]
        cfg = loaded.config
        entry["amp"] = amp_on(device, cfg.run.amp)
        post = cfg.model.postprocess.model_copy(update={"score_threshold": score_threshold})
        backend = TimedBackend(TorchBackend(loaded.model, post, device, entry["amp"], cfg.run.channels_last), device)
        for _ in range(2):  # the first call warms up (kernel selection, allocator, lazy init)
            record = predict_images(backend, [image], cfg.data.image_size, loaded.class_names, 1, progress=False)[0]
        entry["inference_seconds"] = backend.seconds
    except DetpactError:
        raise  # the checkpoint itself is unusable: bad input on every device
    except Exception as exc:  # a device that breaks is the finding; the others still run
        return {**entry, "status": "fail", "reason": f"{type(exc).__name__}: {exc}"}, None, config_hash
    entry.update(status="pass", detections=len(record["detections"]))
    return entry, record["detections"], config_hash


def compare_detections(reference: list[dict], other: list[dict], min_iou: float = MATCH_IOU) -> dict[str, Any]:
    """Match two devices' detections ({"box" xyxy, "score", "class_id"}) greedily, within a
    class and by best IoU first (pairs under `min_iou` never match), and measure them.

    Returns {"max_box_diff": largest |coordinate difference| of a matched pair (px),
    "max_score_diff", "unmatched": detections without a partner, on either side,
    "max_unmatched_score": the best score among those (0.0 when none)}.
    """
    box_diff = score_diff = 0.0
    matched_ref: set[int] = set()
    matched_other: set[int] = set()
    for i, j in _greedy_pairs(reference, other, min_iou):
        matched_ref.add(i)
        matched_other.add(j)
        a, b = reference[i], other[j]
        box_diff = max(box_diff, max(abs(u - v) for u, v in zip(a["box"], b["box"])))
        score_diff = max(score_diff, abs(a["score"] - b["score"]))
    left = [d for i, d in enumerate(reference) if i not in matched_ref]
    left += [d for j, d in enumerate(other) if j not in matched_other]
    return {"max_box_diff": round(box_diff, 4), "max_score_diff": round(score_diff, 6), "unmatched": len(left),
            "max_unmatched_score": max((d["score"] for d in left), default=0.0)}


def _greedy_pairs(reference: list[dict], other: list[dict], min_iou: float) -> list[tuple[int, int]]:
    """(reference index, other index) pairs: same class, highest IoU first, each detection once."""
    if not reference or not other:
        return []
    iou, _ = box_iou(torch.tensor([d["box"] for d in reference], dtype=torch.float64),
                     torch.tensor([d["box"] for d in other], dtype=torch.float64))  # [N, M]
    same_class = torch.tensor([d["class_id"] for d in reference])[:, None] == \
        torch.tensor([d["class_id"] for d in other])[None, :]  # [N, M]
    iou = torch.where(same_class, iou, torch.zeros_like(iou))
    candidates = sorted(((float(iou[i, j]), i, j) for i, j in (iou >= min_iou).nonzero().tolist()), reverse=True)
    pairs, used_ref, used_other = [], set(), set()
    for _, i, j in candidates:
        if i not in used_ref and j not in used_other:
            pairs.append((i, j))
            used_ref.add(i)
            used_other.add(j)
    return pairs


def _judge(entry: dict[str, Any], diff: dict[str, Any], tolerance: Mapping[str, float], threshold: float) -> None:
    """Fail `entry` when its detections differ from the reference's beyond `tolerance`.

    A detection only one device found fails it only when it scores clearly above the
    threshold: one within the score tolerance of it may fall either side on another device.
    """
    entry.update(max_box_diff=diff["max_box_diff"], max_score_diff=diff["max_score_diff"],
                 unmatched=diff["unmatched"])
    problems = []
    if diff["max_box_diff"] > tolerance["box_px"]:
        problems.append(f"box differs by {diff['max_box_diff']:g} px > {tolerance['box_px']:g}")
    if diff["max_score_diff"] > tolerance["score"]:
        problems.append(f"score differs by {diff['max_score_diff']:g} > {tolerance['score']:g}")
    if diff["max_unmatched_score"] > threshold + tolerance["score"]:
        problems.append(f"{diff['unmatched']} detections found on one device only "
                        f"(best score {diff['max_unmatched_score']:.3f})")
    if problems:
        entry.update(status="fail", reason=f"differs from the {REFERENCE}: " + "; ".join(problems))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def print_smoke(report: dict[str, Any], output_json: str | Path) -> None:
    table = Table(show_header=True, header_style="bold", box=None)
    for column in ("device", "result", "amp", "load s", "infer s", "dets", "box diff", "score diff", "unmatched",
                   "detail"):
        table.add_column(column, justify="left" if column in ("device", "result", "amp", "detail") else "right")
    styles = {"pass": "green", "skip": "yellow", "fail": "bold red"}

    def cell(value: Any, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    for name, e in report["devices"].items():
        table.add_row(escape(name), f"[{styles[e['status']]}]{e['status'].upper()}[/]", cell(e["amp"]),
                      cell(e["load_seconds"], ".3f"), cell(e["inference_seconds"], ".4f"), cell(e["detections"]),
                      cell(e["max_box_diff"], "g"), cell(e["max_score_diff"], "g"), cell(e["unmatched"]),
                      escape(e.get("reason", "")))
    failed = [name for name, e in report["devices"].items() if e["status"] == "fail"]
    out = Console(width=max(120, Console().width))
    out.print(table)
    verdict = f"[bold red]FAIL[/] ({escape(', '.join(failed))})" if failed else "[green]PASS[/]"
    out.print(f"smoke: {verdict} -> {escape(str(output_json))}")
