"""Inference latency of the exported ONNX graph under ONNX Runtime versus PyTorch eager,
batch 1 on the CPU, for each detection head at each input size.

For every head (its quickstart config) and size, one seeded, randomly initialised model
in eval mode is exported with the config's exporter and opset to a temporary file. Three
variants then run the same forward pass, `DeployModel` (boxes and sigmoid scores, no
postprocessing), on one random [1, 3, S, S] image:

- onnx: an ONNX Runtime session, CPUExecutionProvider, ORT_ENABLE_ALL, with as many
  intra-op threads as torch uses (ORT's own default, the physical core count, is the
  same 2 on this VM; fixing it keeps the sides equal on any machine), spinning and the
  memory arena on (ORT's defaults; the best settings tried, docs/benchmarks.md);
- eager bf16: what a user runs here, `torch.inference_mode()` with the config's
  precision (`run.amp: bf16` autocast, `run.channels_last`), as `detpact predict` does;
- eager fp32: plain fp32 with contiguous memory, for reference.

After warm-up the variants alternate in blocks of `--iters` calls in one process (this
machine is noisy); the figures are medians over blocks of the per-block mean latency,
and the ratios are medians of per-block ratios. Each block starts after a `--pause`:
ORT's worker threads spin for about 50 ms after a call (torch's for about 10 ms), and
without the pause that spinning took a core from the next variant's block (eager
measured about 20 % slower right after an ORT block than alone).

    .venv/bin/python bench/onnx_latency.py [--sizes 320,640] [--heads dense,rtdetr] [--blocks 7] [--iters 10]

"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from detpact.config import load_config
from detpact.data.shapes import CLASS_NAMES
from detpact.engine.runtime import autocast
from detpact.export.onnx import INPUT_NAME, DeployModel, export_onnx
from detpact.models.detector import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"dense": "quickstart.yaml", "rtdetr": "rtdetr_quickstart.yaml"}
# Both configs train on the built-in shapes dataset; its class count, without generating it.
NUM_CLASSES = len(CLASS_NAMES)
VARIANTS = ("onnx", "eager bf16", "eager fp32")
TARGET = 0.55  # ONNX / eager bf16 at 320 px
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
}


def ort_session(path: Path, args: argparse.Namespace) -> ort.InferenceSession:
    """The session the bench times; the flags only exist to rerun the alternatives tried."""
    threads = args.ort_threads or torch.get_num_threads()
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[args.level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads if args.parallel else 1
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if args.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = not args.no_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if args.no_spin else "1")
    if args.static_batch:  # the graph's batch axis is dynamic; 1 lets ORT fold more shapes
        options.add_free_dimension_override_by_name("batch", 1)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def make_variants(head: str, size: int, workdir: Path, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The three forward passes of one (head, size), each a no-argument call on the same image."""
    cfg = load_config(REPO / "configs" / CONFIGS[head])
    torch.manual_seed(0)
    deploy = DeployModel(build_model(cfg.model, NUM_CLASSES)).eval()
    path = workdir / f"{head}_{size}.onnx"
    export_onnx(deploy, path, size, args.opset or cfg.export.opset, args.exporter or cfg.export.exporter)
    session = ort_session(path, args)
    device = torch.device("cpu")
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    feed = {INPUT_NAME: image.numpy()}

    user = copy.deepcopy(deploy)  # Module.to(memory_format) works in place: keep the fp32 model contiguous
    user_image = image
    if cfg.run.channels_last:
        user = user.to(memory_format=torch.channels_last)
        user_image = image.contiguous(memory_format=torch.channels_last)

    def eager_user():
        with torch.inference_mode(), autocast(device, cfg.run.amp):
            return user(user_image)

    def eager_fp32():
        with torch.inference_mode():
            return deploy(image)

    # The same graph on both sides: the outputs agree (bf16 only roughly).
    reference = [t.numpy() for t in eager_fp32()]
    got = session.run(None, feed)
    if not all(g.shape == r.shape for g, r in zip(got, reference)):
        raise RuntimeError(f"{head} @{size}: ONNX outputs {[g.shape for g in got]} != eager {[r.shape for r in reference]}")
    return {"onnx": lambda: session.run(None, feed), "eager bf16": eager_user, "eager fp32": eager_fp32}


def measure(variants: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-block mean latency in ms of each variant, the variants alternating block by block."""
    blocks, iters = args.blocks, args.iters
    for run in variants.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(blocks):
        for name, run in variants.items():
            time.sleep(args.pause)  # let the other runtime's spinning threads go to sleep
            started = time.perf_counter()
            for _ in range(iters):
                run()
            times[name].append((time.perf_counter() - started) / iters * 1000)
    return times


def ratio(times: dict[str, list[float]], name: str) -> str:
    ratios = [a / b for a, b in zip(times["onnx"], times[name])]
    return f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="320,640", help="input sizes, comma-separated")
    parser.add_argument("--heads", default="dense,rtdetr", help=f"heads, comma-separated ({', '.join(CONFIGS)})")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per variant")
    parser.add_argument("--iters", type=int, default=10, help="forward passes per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes per variant first")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of sleep before each block")
    # Alternatives to the timed ORT set-up, to rerun what docs/benchmarks.md records:
    parser.add_argument("--ort-threads", type=int, default=0, help="ORT intra-op threads (0: torch's count)")
    parser.add_argument("--level", choices=LEVELS, default="all", help="ORT graph optimisation level")
    parser.add_argument("--no-spin", action="store_true", help="ORT worker threads sleep instead of spinning")
    parser.add_argument("--no-arena", action="store_true", help="disable ORT's CPU memory arena")
    parser.add_argument("--parallel", action="store_true", help="ORT_PARALLEL execution mode")
    parser.add_argument("--static-batch", action="store_true", help="fix the ONNX batch axis to 1 in the session")
    parser.add_argument("--opset", type=int, default=0, help="export opset (0: the config's)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), help="the exporter (default: the config's)")
    args = parser.parse_args()
    heads = args.heads.split(",")
    unknown = set(heads) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown heads {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime {ort.__version__}; "
          f"{NUM_CLASSES} classes; batch 1; {args.blocks} blocks of {args.iters} after {args.warmup} warm-up; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = ["head", "size"] + [f"{v} ms" for v in VARIANTS] + ["onnx / eager bf16", "onnx / eager fp32"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with tempfile.TemporaryDirectory() as workdir:
        for head in heads:
            for size in sizes:
                times = measure(make_variants(head, size, Path(workdir), args), args)
                cells = [head, str(size)] + [f"{statistics.median(times[v]):.1f}" for v in VARIANTS]
                lines.append("| " + " | ".join(cells + [ratio(times, "eager bf16"), ratio(times, "eager fp32")]) + " |")
                print(lines[-1], flush=True)
    print(f"\nratios: median over blocks (min–max); target onnx / eager bf16 <= {TARGET} at 320; "
          f"load average at the end {os.getloadavg()[0]:.2f}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
