"""Data-parallel throughput: 2 training processes (torchrun, gloo) versus 1 process.

Both variants train the quickstart model on the quickstart data with the same global
batch of 16: one process with batch 16 and every core, or two processes with batch 8
and an equal share of the cores each. Each variant is a real `detpact train` run
(max_steps = warm-up + timed steps, no validation, no export); its training speed is
read from its own per-step log after the warm-up. The variants alternate and the ratio
is the median over repeats (this machine is shared and noisy).

On a CPU machine both variants share the same cores, so the ratio measures the cost of
the processes' communication and duplicated work rather than a speed-up; on GPUs each
process has its own device.

    .venv/bin/python bench/ddp.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5


def images_per_second(nproc: int, steps: int, root: Path, run_id: str, config: str) -> float:
    """Training images per second of one run with `nproc` processes, after the warm-up."""
    threads = max(1, torch.get_num_threads() // nproc)
    sets = [f"train.max_steps={WARMUP + steps}", f"train.batch_size={16 // nproc}", "train.nominal_batch=null",
            "eval.every_epochs=1000", "train.checkpoint.every_epochs=null", "export.onnx=false",
            f"run.num_threads={threads}", "logging.progress=false"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    command = [*launcher, "-m", "detpact", "train", config, "--run-id", run_id]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "DETPACT_OUTPUT_DIR": str(root), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (root / run_id / "reports" / "train_metrics.jsonl").read_text().splitlines()]
    timed = lines[WARMUP:]
    seconds = timed[-1]["time_s"] - lines[WARMUP - 1]["time_s"]
    return 16 * len(timed) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    args = parser.parse_args()
    print(f"quickstart model, global batch 16, {torch.get_num_threads()} cores shared, {args.steps} timed steps "
          f"after {WARMUP} warm-up")
    ratios = []
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            one = images_per_second(1, args.steps, Path(root), f"one_{repeat}", args.config)
            two = images_per_second(2, args.steps, Path(root), f"two_{repeat}", args.config)
            ratios.append(two / one)
            print(f"repeat {repeat + 1}: 1 process {one:.1f} img/s, 2 processes {two:.1f} img/s, ratio {two / one:.3f}")
    print(f"2-process / 1-process throughput: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
