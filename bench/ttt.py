"""Test-time training benchmark: COCO mAP of a run's best.pt with and without TTT, on its
validation split clean and corrupted, and what --ttt-max-batches saves.

Every measurement is one `detpact test SETTINGS --run RUN [--ttt --ttt-preset P]`
subprocess (the scenario suite: the corrupted splits are the suite's own, through
robustness.corruptions, deterministic per image and seed), printed, so any row can be
rerun by hand. With --ttt the suite adapts a fresh copy of the model on the clean split
and on each corrupted split.

    .venv/bin/python bench/ttt.py --run runs/exp01 [--corruption gaussian_noise] [--severities 1,3,5]
                                  [--presets safe,safe/test,mim_safe] [--max-batches 1,4] [--out DIR]

Table 1: mAP50-95 per scenario (clean, then the corruption at each severity) without TTT
and with each preset (P/STATS adds --ttt-norm-stats STATS: safe/test is Tent with the test
batch's BatchNorm statistics alone, as published; mim_safe is left out for a run without
model.mim_decoder, saying so), the change from no TTT, and the guards that fired.
Table 2: on the strongest severity alone, the suite's wall time and the seconds spent
adapting with --ttt-max-batches N against every batch (preset safe).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DETPACT = [sys.executable, "-m", "detpact"]


def suite(run: Path, settings: Path, flags: list[str], out_json: Path, commands: list[str]) -> dict:
    """One `detpact test` subprocess; its report, with the wall time it took."""
    cmd = [*DETPACT, "test", str(settings), "--run", str(run), "--out", str(out_json), *flags]
    shown = shlex.join(["detpact", *cmd[3:]])
    commands.append(shown)
    print(f"$ {shown}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {shown}\n{result.stderr[-3000:]}")
    report = json.loads(out_json.read_text())
    report["wall_s"] = time.perf_counter() - started
    return report


def write_settings(path: Path, corruption: str, severities: list[int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"seed": seed, "scenarios": [{"corruption": corruption,
                                                                  "severities": severities}]}))
    return path


def has_mim_decoder(run: Path) -> bool:
    resolved = yaml.safe_load((run / "reports" / "config_resolved.yaml").read_text())
    return bool(resolved["model"].get("mim_decoder"))


def preset_flags(preset: str) -> list[str]:
    if preset == "none":
        return []
    name, _, stats = preset.partition("/")
    return ["--ttt", "--ttt-preset", name, *(["--ttt-norm-stats", stats] if stats else [])]


def scores(report: dict) -> dict[str, float]:
    """Scenario name -> mAP50-95, clean first."""
    return {"clean": report["clean"]["map50_95"], **{row["name"]: row["map50_95"] for row in report["scenarios"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (e.g. the quickstart's)")
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--presets", default="safe,safe/test,mim_safe",
                        help="TTT presets to compare with no TTT (P/STATS: with --ttt-norm-stats STATS)")
    parser.add_argument("--max-batches", default="1,4", help="--ttt-max-batches values timed (preset safe)")
    parser.add_argument("--seed", type=int, default=0, help="the corruptions' seed")
    parser.add_argument("--out", type=Path, help="folder for the settings and reports (default: a new temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ttt-bench-"))
    severities = [int(s) for s in args.severities.split(",")]
    requested = [p for p in args.presets.split(",") if p]
    skipped = [p for p in requested if p.startswith("mim_safe") and not has_mim_decoder(args.run)]
    presets = ["none", *[p for p in requested if p not in skipped]]
    commands: list[str] = []
    settings = write_settings(out / "settings.yaml", args.corruption, severities, args.seed)
    reports = {p: suite(args.run, settings, preset_flags(p), out / f"suite_{p.replace('/', '_')}.json", commands)
               for p in presets}
    strongest = write_settings(out / "strongest.yaml", args.corruption, [max(severities)], args.seed)
    timing = []
    if args.max_batches:
        for limit in ["all", *args.max_batches.split(",")]:
            flags = preset_flags("safe") + ([] if limit == "all" else ["--ttt-max-batches", limit])
            timing.append((limit, suite(args.run, strongest, flags, out / f"timing_{limit}.json", commands)))
        timing.append(("no TTT", suite(args.run, strongest, [], out / "timing_none.json", commands)))
    print_tables(reports, presets, skipped, timing, f"{args.corruption}@{max(severities)}")
    (out / "results.json").write_text(json.dumps({"reports": reports, "commands": commands}, indent=2))
    print(f"\nreports: {out}")


def print_tables(reports: dict, presets: list[str], skipped: list[str], timing: list, strongest: str) -> None:
    maps = {p: scores(r) for p, r in reports.items()}
    tuned = presets[1:]
    header = ["scenario", *(f"mAP {p}" for p in presets), *(f"change {p}" for p in tuned)]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, base in maps["none"].items():
        cells = [name, *(f"{maps[p][name]:.4f}" for p in presets), *(f"{maps[p][name] - base:+.4f}" for p in tuned)]
        print("| " + " | ".join(cells) + " |")
    for preset in tuned:
        ttt = reports[preset]["ttt"]
        print(f"{preset}: adapted {ttt['adapted_batches']} of {ttt['batches']} batches, {ttt['steps']} steps; "
              f"guards fired: {guard_text(ttt)}")
    for preset in skipped:
        print(f"({preset} left out: the run has no model.mim_decoder)")
    if not timing:
        return
    print(f"\nclean + {strongest}, preset safe:\n| --ttt-max-batches | adapted batches | adapting s | suite wall s | "
          f"mAP {strongest} |\n|---|---|---|---|---|")
    for limit, report in timing:
        ttt = report.get("ttt") or {}
        print(f"| {limit} | {ttt.get('adapted_batches', 0)} of {ttt.get('batches', '-')} | "
              f"{ttt.get('adapt_seconds', 0):.1f} | {report['wall_s']:.1f} | {scores(report)[strongest]:.4f} |")


def guard_text(ttt: dict) -> str:
    fired = {k: v for k, v in ttt["guards"].items() if v}
    return ", ".join(f"{k} {v}" for k, v in fired.items()) or "none"


if __name__ == "__main__":
    main()
