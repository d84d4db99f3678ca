"""Continual benchmark: how much of task A each fine-tuning method keeps after task B.

Task A trains a detector on one synthetic domain (`data.synthetic.domain`, default
`plain`); task B fine-tunes task A's best.pt (`model.init_from`) on another domain
(default `night`, its own data seed) once per method: plain fine-tuning, LoRA,
self-distillation from task A's best.pt, EWC and SI (task A's checkpoints/continual.pt)
and DER++ (task A's replay buffer). Every run goes through the `detpact` CLI from a YAML
file written under --out, and every command is printed, so any row can be rerun by hand.

    .venv/bin/python bench/continual.py [--out DIR] [--size 96] [--steps-a 300] [--steps-b 150] [--freeze-bn]

`--freeze-bn` runs every task-B method with `model.freeze_bn: true` (BatchNorm running
statistics held at task A's), as runs `task_b_<method>_frozenbn`. A task A already trained
in --out with the same config is reused instead of trained again.

The table: task A's mAP on domain A's val split before task B (task A's best.pt) and
after it (each task-B run's best.pt, `detpact eval RUN --data CONFIG_OF_A`), forgetting
= before - after, task B's mAP on domain B's val split, and the last logged value of
each penalty beside the detection loss (reports/train_metrics.jsonl).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DETPACT = [sys.executable, "-m", "detpact"]


def base_config(args: argparse.Namespace, out: Path, domain: str, data_seed: int, steps: int) -> dict:
    """The quickstart recipe at a small size: cspdarknet_n, bf16 + channels_last, flips only."""
    return {
        "config_version": 1,
        "run": {"name": "continual", "seed": args.seed, "amp": "bf16", "channels_last": True,
                "output_root": str(out / "runs")},
        "task": "shapes-continual",
        "data": {
            "format": "synthetic",
            "path": str(out / "data" / f"{domain}-seed{data_seed}"),
            "image_size": args.size,
            "num_workers": 0,
            "synthetic": {"num_train": args.num_train, "num_val": args.num_val, "image_size": args.size,
                          "seed": data_seed, "domain": domain},
            "augment": {"mosaic_p": 0.0, "scale": 0.0, "translate": 0.0, "hsv_h": 0.0, "hsv_s": 0.0,
                        "hsv_v": 0.0, "hflip_p": 0.5},
        },
        "model": {"backbone": {"name": "cspdarknet_n"}},
        "train": {
            "epochs": 1000, "max_steps": steps, "batch_size": args.batch, "nominal_batch": None,
            "optimizer": {"lr": args.lr, "weight_decay": 0.05},
            "scheduler": {"warmup_steps": min(50, steps // 5), "min_lr_ratio": 0.05},
            "ema": {"decay": 0.98, "warmup_steps": min(50, steps // 5)},
            "checkpoint": {"every_steps": args.eval_every, "every_epochs": None},
        },
        "eval": {"every_steps": args.eval_every, "every_epochs": 1000, "batch_size": 32},
        "export": {"onnx": False},
        "logging": {"progress": False, "reports": False},
    }


def method_settings(args: argparse.Namespace, run_a: Path) -> dict[str, dict]:
    """Task B's `train:` additions per method (on top of model.init_from = A's best.pt)."""
    best, state = str(run_a / "checkpoints" / "best.pt"), str(run_a / "checkpoints" / "continual.pt")
    return {
        "finetune": {},
        "lora": {"lora": {"r": args.lora_r, "target": "all_conv1x1"}},
        "self_distill": {"continual": {"self_distill": {"teacher": best, "weight": args.distill_weight}}},
        "ewc": {"continual": {"previous": state, "ewc": {"weight": args.ewc_lambda}}},
        "si": {"continual": {"previous": state, "si": {"c": args.si_c}}},
        "derpp": {"continual": {"previous": state, "derpp": {"alpha": args.derpp_alpha, "beta": args.derpp_beta,
                                                             "buffer_size": args.buffer}}},
    }


def trained_before(out: Path, cfg_a: dict) -> bool:
    """Whether --out already holds a finished task A trained from this very config."""
    config, state = out / "configs" / "task_a.yaml", out / "runs" / "task_a" / "checkpoints" / "continual.pt"
    return state.is_file() and config.is_file() and yaml.safe_load(config.read_text()) == cfg_a


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(cmd: list[str], log: Path, commands: list[str]) -> float:
    """Run one detpact command (output to `log`), record it; returns its wall time."""
    shown = shlex.join(["python", "-m", "detpact", *cmd[len(DETPACT):]])
    commands.append(shown)
    print(f"$ {shown}", flush=True)
    started = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        sys.exit(f"failed (exit {done.returncode}): {shown}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def evaluate(run_dir: Path, data_config: Path | None, out_json: Path, logs: Path, commands: list[str]) -> dict:
    cmd = [*DETPACT, "eval", str(run_dir), "--out", str(out_json)]
    if data_config is not None:
        cmd += ["--data", str(data_config)]
    run(cmd, logs / f"{out_json.stem}.log", commands)
    return json.loads(out_json.read_text())


def metric(report: dict, name: str) -> float:
    metrics = report.get("metrics", report)
    return float(metrics[name])


def last_losses(run_dir: Path) -> dict[str, float]:
    """The last logged value of each loss component of a run (reports/train_metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "reports" / "train_metrics.jsonl").read_text().splitlines()
            if line.strip()]
    losses: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss") and isinstance(value, (int, float)):
                losses[key] = float(value)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for configs, data and runs (default: a new temp folder)")
    parser.add_argument("--domain-a", default="plain", choices=("plain", "cluttered", "night"))
    parser.add_argument("--domain-b", default="night", choices=("plain", "cluttered", "night"))
    parser.add_argument("--size", type=int, default=96, help="image size (multiple of 32)")
    parser.add_argument("--steps-a", type=int, default=300, help="task A's optimizer steps")
    parser.add_argument("--steps-b", type=int, default=150, help="each task B run's optimizer steps")
    parser.add_argument("--eval-every", type=int, default=75, help="validation (and best.pt) every N steps")
    parser.add_argument("--num-train", type=int, default=1000, help="training images per domain")
    parser.add_argument("--num-val", type=int, default=200, help="validation images per domain")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0, help="run.seed of every run")
    parser.add_argument("--methods", default="finetune,lora,self_distill,ewc,si,derpp")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--ewc-lambda", type=float, default=1000.0)
    parser.add_argument("--si-c", type=float, default=1.0)
    parser.add_argument("--derpp-alpha", type=float, default=0.5)
    parser.add_argument("--derpp-beta", type=float, default=0.5)
    parser.add_argument("--buffer", type=int, default=200, help="DER++ buffer size (filled during task A)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="task B runs hold the BatchNorm statistics of task A (model.freeze_bn)")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="detpact-continual-"))).resolve()
    configs, logs = out / "configs", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    print(f"continual benchmark in {out}", flush=True)

    # Task A: save_state hands on its Fisher, SI importance and DER++ buffer (continual.pt).
    cfg_a = base_config(args, out, args.domain_a, 0, args.steps_a)
    cfg_a["train"]["continual"] = {"save_state": True, "derpp": {"buffer_size": args.buffer}}
    config_a, reuse_a = configs / "task_a.yaml", trained_before(out, cfg_a)
    write_config(config_a, cfg_a)
    config_b_data = write_config(configs / "domain_b_data.yaml", base_config(args, out, args.domain_b, 1, args.steps_b))
    run_a = out / "runs" / "task_a"
    if reuse_a:
        print(f"task A: reusing {run_a} (trained before with the same config)", flush=True)
        seconds_a = 0.0
    else:
        seconds_a = run([*DETPACT, "train", str(config_a), "--run-id", "task_a"], logs / "task_a.log", commands)
    before = evaluate(run_a, None, out / "eval" / "task_a_on_a.json", logs, commands)
    zero_shot = evaluate(run_a, config_b_data, out / "eval" / "task_a_on_b.json", logs, commands)

    rows = [{"method": "task A only", "a50_95": metric(before, "map50_95"), "a50": metric(before, "map50"),
             "b50_95": metric(zero_shot, "map50_95"), "b50": metric(zero_shot, "map50"), "seconds": seconds_a,
             "losses": last_losses(run_a)}]
    settings = method_settings(args, run_a)
    for method in args.methods.split(","):
        if method not in settings:
            sys.exit(f"unknown method {method!r}; choose from {', '.join(settings)}")
        cfg = base_config(args, out, args.domain_b, 1, args.steps_b)
        cfg["model"]["init_from"] = str(run_a / "checkpoints" / "best.pt")
        cfg["model"]["freeze_bn"] = args.freeze_bn
        cfg["train"] = merge(cfg["train"], settings[method])
        name = f"task_b_{method}" + ("_frozenbn" if args.freeze_bn else "")
        config = write_config(configs / f"{name}.yaml", cfg)
        run_b = out / "runs" / name
        seconds = run([*DETPACT, "train", str(config), "--run-id", run_b.name], logs / f"{run_b.name}.log", commands)
        after = evaluate(run_b, config_a, out / "eval" / f"{run_b.name}_on_a.json", logs, commands)
        own = evaluate(run_b, None, out / "eval" / f"{run_b.name}_on_b.json", logs, commands)
        rows.append({"method": method, "a50_95": metric(after, "map50_95"), "a50": metric(after, "map50"),
                     "b50_95": metric(own, "map50_95"), "b50": metric(own, "map50"), "seconds": seconds,
                     "losses": last_losses(run_b)})

    print_table(rows, args)
    results = out / ("results_frozenbn.json" if args.freeze_bn else "results.json")
    results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                   "rows": rows, "commands": commands}, indent=2))
    print(f"\nconfigs: {configs}   runs: {out / 'runs'}   results: {results}")
    print("to rerun by hand (from the repository root):")
    for shown in commands:
        print(f"  {shown}")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    first = rows[0]
    frozen = ", BatchNorm statistics frozen in task B" if args.freeze_bn else ""
    print(f"\ntask A: {args.domain_a}, task B: {args.domain_b}{frozen}; {args.size} px, {args.steps_a} + {args.steps_b} "
          f"steps of batch {args.batch}, seed {args.seed}, {os.cpu_count()} CPU cores")
    header = ("| method | A mAP50-95 before | A mAP50-95 after | forgetting | A mAP50 before | A mAP50 after "
              "| forgetting50 | B mAP50-95 | B mAP50 | train s | last losses (det / penalties) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        is_a = row is first
        after = "" if is_a else f"{row['a50_95']:.3f}"
        after50 = "" if is_a else f"{row['a50']:.3f}"
        forget = "" if is_a else f"{first['a50_95'] - row['a50_95']:+.3f}"
        forget50 = "" if is_a else f"{first['a50'] - row['a50']:+.3f}"
        b_note = " (zero-shot)" if is_a else ""
        losses = " / ".join(f"{k.removeprefix('loss_') or 'total'} {v:.3g}" for k, v in row["losses"].items())
        print(f"| {row['method']} | {first['a50_95']:.3f} | {after} | {forget} | {first['a50']:.3f} | {after50} "
              f"| {forget50} | {row['b50_95']:.3f}{b_note} | {row['b50']:.3f} | {row['seconds']:.0f} | {losses} |")


if __name__ == "__main__":
    main()
