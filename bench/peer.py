"""detpact vs Ultralytics YOLO11n on raccoon: the same split, images and judge; prints the ratio.

Both tools train from scratch on the 160 training images of configs/raccoon.yaml (its
committed split manifest) at 320 px, batch 16, each run alone on the CPU with the same
thread count. One judge scores both: pycocotools on the 40 validation images, at most
100 detections per image, score threshold 0.001, on each tool's final checkpoint
(detpact's best.pt is chosen on these same 40 images, so it would flatter detpact).

    .venv/bin/python bench/peer.py                  # equal images (36 epochs = 5,760), fp32, seeds 0 1 2
    .venv/bin/python bench/peer.py --equal-time     # equal wall time, each tool's fastest CPU precision
    .venv/bin/python bench/peer.py --tools detpact --seeds 0 --set train.optimizer.lr=0.001

Ultralytics needs torchvision and the full PyPI torch build, which cannot share detpact's
venv: on first use this script builds `.venv-peer/` (about 4 GB) with
`PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null pip install torch==2.13.0 torchvision==0.28.0
ultralytics`. It never downloads weights or fonts (`pretrained=False`, `plots=False`,
`YOLO_OFFLINE=1`); bench/peer_yolo.py is the part that runs there.

With `--equal-time`, YOLO11n trains as above at fp32 (Ultralytics refuses bf16 autocast
on the CPU), and its median wall time becomes the budget of detpact at bf16 +
channels_last, which trains for as many epochs as fit in it by the epoch time of an
8-epoch calibration run. Wall time is the whole `train` command, start-up and
validation included. Finished runs are kept in <work>/peer_results.json and reused when
the same run (tool, seed, precision, epochs and, for detpact, the hashes of its resolved
config and of its source, so that a change of defaults or code trains again) is asked
for again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / ".venv-peer"
PEER_PACKAGES = ["torch==2.13.0", "torchvision==0.28.0", "ultralytics>=8.3,<9"]
CONFIG = REPO / "configs" / "raccoon.yaml"
EPOCH_IMAGES = 160  # raccoon's training split
# Validations below this map50_95 are noise on 40 images (a model that has not learnt to
# place boxes yet); the second drop column counts only drops from a best above it.
NOISE_FLOOR = 0.05
CALIBRATION_EPOCHS = 8  # --equal-time: two validations at the default cadence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5760, help="images seen per run (a multiple of 160)")
    parser.add_argument("--equal-time", action="store_true",
                        help="detpact at bf16 for YOLO11n's fp32 wall time, instead of equal images")
    parser.add_argument("--detpact-epochs", type=int, default=None,
                        help="with --equal-time: train detpact this many epochs instead of calibrating")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tools", nargs="+", default=["detpact", "yolo11n"], choices=["detpact", "yolo11n"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra detpact --set override")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "peer", help="working folder")
    parser.add_argument("--eval-every", type=int, default=4, help="detpact validation cadence, in epochs")
    args = parser.parse_args()

    work = args.work.resolve()
    data = write_shared_split(work / "data")
    if "yolo11n" in args.tools or args.equal_time:
        ensure_peer_venv()
    store = work / "peer_results.json"
    known = json.loads(store.read_text()) if store.is_file() else []
    epochs = args.images // EPOCH_IMAGES
    plan = [("yolo11n", "fp32", epochs)] if "yolo11n" in args.tools or args.equal_time else []
    results = [run_once(known, store, tool, seed, precision, n, args, data, work)
               for tool, precision, n in plan for seed in args.seeds]
    if "detpact" in args.tools:
        if args.equal_time:
            budget = statistics.median(r["wall_s"] for r in results)
            fit = args.detpact_epochs or epochs_for_budget(budget, args, data, work)
            plan = [("detpact", "bf16", fit)]
            print(f"budget {budget:.0f} s (YOLO11n's median): detpact bf16 trains {plan[0][2]} epochs", flush=True)
        else:
            plan = [("detpact", "fp32", epochs)]
        results += [run_once(known, store, tool, seed, precision, n, args, data, work)
                    for tool, precision, n in plan for seed in args.seeds]
    print_summary(results)


def run_once(known: list[dict], store: Path, tool: str, seed: int, precision: str, epochs: int, args, data: dict,
             work: Path) -> dict:
    """One training run and its judgement, or the stored result of the same run."""
    key = {"tool": tool, "seed": seed, "precision": precision, "epochs": epochs}
    if tool == "detpact":  # the resolved config and the code: a change of either trains again
        key["config_hash"] = detpact_config_hash(seed, epochs, precision, args, work)
        key["source_hash"] = detpact_source_hash()
    for row in known:
        if all(row.get(k) == v for k, v in key.items()):
            print(f"reusing {key}", flush=True)
            return row
    row = (train_yolo if tool == "yolo11n" else train_detpact)(seed, epochs, precision, args, data, work)
    row.update(judge(row.pop("predictions"), data["gt"]), **key, overrides=args.overrides if tool == "detpact" else [])
    known.append(row)
    store.write_text(json.dumps(known, indent=2))
    print(json.dumps({k: v for k, v in row.items() if k != "val_curve"}), flush=True)
    return row


# --- the shared split ------------------------------------------------------------------


def write_shared_split(folder: Path) -> dict:
    """raccoon's detpact split as an Ultralytics dataset (symlinked images, YOLO labels) plus
    COCO ground truth of the validation images in original pixels; read by detpact's reader."""
    os.chdir(REPO)  # the config's data.path and split manifest are relative to the repository
    from detpact.commands.runs import cache_dir
    from detpact.config import load_config
    from detpact.data.build import build_datasets

    cfg = load_config(CONFIG)
    splits = build_datasets(cfg.data, cache_dir(None))
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(splits.class_names)]}
    lists = {}
    for split, samples in (("train", splits.train), ("val", splits.val)):
        images, labels = folder / "images" / split, folder / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        paths = []
        for sample in samples:
            link = images / sample.image_path.name
            if not link.is_symlink():
                link.symlink_to(sample.image_path.resolve())
            rows = []
            for box, label in zip(sample.boxes.astype(np.float64), sample.labels):
                x1, y1, x2, y2 = box
                rows.append(f"{label} {(x1 + x2) / 2 / sample.width:.8f} {(y1 + y2) / 2 / sample.height:.8f} "
                            f"{(x2 - x1) / sample.width:.8f} {(y2 - y1) / sample.height:.8f}")
            (labels / f"{link.stem}.txt").write_text("\n".join(rows) + "\n" if rows else "")
            paths.append(str(link))
            if split == "val":
                image_id = len(gt["images"])
                gt["images"].append({"id": image_id, "file_name": link.name, "width": sample.width,
                                     "height": sample.height})
                for box, label in zip(sample.boxes.astype(np.float64), sample.labels):
                    x1, y1, x2, y2 = box.tolist()
                    gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                              "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                              "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        lists[split] = folder / f"{split}.txt"
        lists[split].write_text("\n".join(paths) + "\n")
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(splits.class_names))
    (folder / "dataset.yaml").write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    (folder / "val_gt.json").write_text(json.dumps(gt))
    return {"yaml": folder / "dataset.yaml", "val_list": lists["val"], "gt": gt}


def ensure_peer_venv() -> None:
    stamp = PEER_VENV / ".peer-installed"
    if stamp.is_file():
        return
    print(f"building {PEER_VENV} for Ultralytics (torch + torchvision from PyPI, ~4 GB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "--quiet", *PEER_PACKAGES], check=True, env=env)
    stamp.touch()


# --- training each tool ----------------------------------------------------------------


def detpact_sets(seed: int, epochs: int, precision: str, args, work: Path) -> list[str]:
    """The --set overrides of one detpact run (on top of configs/raccoon.yaml)."""
    return [f"run.seed={seed}", f"train.epochs={epochs}", f"run.num_threads={args.threads}",
            f"run.amp={'none' if precision == 'fp32' else 'bf16'}", f"run.channels_last={precision != 'fp32'}",
            f"eval.every_epochs={args.eval_every}", "export.onnx=false", f"run.output_root={work / 'runs'}",
            "logging.progress=false", *args.overrides]


def detpact_config_hash(seed: int, epochs: int, precision: str, args, work: Path) -> str:
    from detpact.config import config_hash, load_config

    return config_hash(load_config(CONFIG, detpact_sets(seed, epochs, precision, args, work)))


def detpact_source_hash() -> str:
    """sha256 of detpact's source files as they are in the working tree."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src" / "detpact").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def detpact_run_dir(seed: int, epochs: int, precision: str, work: Path) -> Path:
    return work / "runs" / f"detpact_s{seed}_{precision}_e{epochs}"


def train_detpact(seed: int, epochs: int, precision: str, args, data: dict, work: Path) -> dict:
    run = detpact_run_dir(seed, epochs, precision, work)
    run_id = run.name
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
    command = [str(REPO / ".venv" / "bin" / "detpact"), "train", str(CONFIG), "--run-id", run_id]
    for item in detpact_sets(seed, epochs, precision, args, work):
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started

    from detpact.inference.predictor import load_detector, predict_images

    loaded = load_detector(run / "checkpoints" / "last.pt")
    post = loaded.config.model.postprocess
    images = [Path(p) for p in data["val_list"].read_text().split()]
    records = predict_images(loaded, images, post)
    predictions = [{"image": r["image"], "boxes_xyxy": [d["box_xyxy"] for d in r["detections"]],
                    "scores": [d["score"] for d in r["detections"]], "labels": [d["class_id"] for d in r["detections"]]}
                   for r in records]
    report = json.loads((run / "reports" / "train_report.json").read_text())
    curve = [(line["step"], line["map50_95"]) for line in map(json.loads, (run / "reports" / "val_metrics.jsonl")
                                                              .read_text().splitlines())]
    return {"tool": "detpact", "seed": seed, "precision": precision, "epochs": epochs,
            "images_seen": report["counters"]["samples_seen"], "wall_s": round(seconds, 1),
            "num_params": report["counters"]["num_params"], "val_curve": curve,
            "collapse": worst_collapse(curve), "collapse_from_005": worst_collapse(curve, NOISE_FLOOR),
            "predictions": predictions}


def train_yolo(seed: int, epochs: int, precision: str, args, data: dict, work: Path) -> dict:
    out = work / "yolo" / f"yolo11n_s{seed}_e{epochs}"
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    command = [str(PEER_VENV / "bin" / "python"), str(REPO / "bench" / "peer_yolo.py"), "--data", str(data["yaml"]),
               "--val-list", str(data["val_list"]), "--epochs", str(epochs), "--seed", str(seed),
               "--threads", str(args.threads), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    result = json.loads((out / "predictions.json").read_text())
    return {"tool": "yolo11n", "seed": seed, "precision": precision, "epochs": epochs,
            "images_seen": epochs * EPOCH_IMAGES, "wall_s": round(seconds, 1), "num_params": result["num_params"],
            "val_curve": [], "collapse": None, "predictions": result["predictions"]}


def epochs_for_budget(budget_s: float, args, data: dict, work: Path) -> int:
    """Epochs of detpact at bf16 that fit in `budget_s`, from one calibration run at the real
    validation cadence. Its per-step log gives the steady epoch time (from the end of its first
    epoch to the end of its last, validations included); the rest of its wall time is the fixed
    cost (start-up, the first epoch's warm-up, the final validation and checkpoint). One long
    window is steadier than the difference of two short runs, which doubles their noise."""
    row = train_detpact(0, CALIBRATION_EPOCHS, "bf16", args, data, work)
    log = detpact_run_dir(0, CALIBRATION_EPOCHS, "bf16", work) / "reports" / "train_metrics.jsonl"
    epoch_end = {}  # epoch -> time_s of its last step
    for record in map(json.loads, log.read_text().splitlines()):
        epoch_end[record["epoch"]] = record["time_s"]
    first, last = min(epoch_end), max(epoch_end)
    per_epoch = (epoch_end[last] - epoch_end[first]) / (last - first)
    fixed = row["wall_s"] - CALIBRATION_EPOCHS * per_epoch
    print(f"detpact bf16 calibration ({CALIBRATION_EPOCHS} epochs, {row['wall_s']:.0f} s): {per_epoch:.2f} s per "
          f"epoch, {fixed:.1f} s fixed", flush=True)
    return max(1, math.floor((budget_s - fixed) / per_epoch))


# --- the judge -------------------------------------------------------------------------


def judge(predictions: list[dict], gt: dict) -> dict:
    """pycocotools COCOeval (bbox, maxDets 100) of one tool's predictions."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {image["file_name"]: image["id"] for image in gt["images"]}
    results = []
    for record in predictions:
        image_id = ids[Path(record["image"]).name]
        ranked = sorted(zip(record["scores"], record["boxes_xyxy"], record["labels"]), key=lambda r: -r[0])[:100]
        for score, (x1, y1, x2, y2), label in ranked:
            if score >= 0.001:
                results.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                                "bbox": [x1, y1, x2 - x1, y2 - y1]})
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            coco = COCO()
            coco.dataset = json.loads(json.dumps(gt))
            coco.createIndex()
            evaluator = COCOeval(coco, coco.loadRes(results) if results else COCO(), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        finally:
            sys.stdout = stdout
    return {"map50_95": round(float(evaluator.stats[0]), 4), "map50": round(float(evaluator.stats[1]), 4),
            "detections": len(results)}


def worst_collapse(curve: list[tuple[int, float]], floor: float = 0.0) -> float | None:
    """The lowest ratio of a validation map50_95 to the best one before it (1.0 = never fell),
    counting only drops from a best of at least `floor`."""
    best, worst = 0.0, 1.0
    for _, value in curve:
        if best > 0 and best >= floor:
            worst = min(worst, value / best)
        best = max(best, value)
    return round(worst, 3) if curve else None


def print_summary(results: list[dict]) -> None:
    tools = sorted({(r["tool"], r["precision"]) for r in results})
    medians = {}
    print("\n| tool | precision | images seen | wall s | map50_95 per seed | median | worst drop | "
          f"worst drop from >= {NOISE_FLOOR} |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, precision in tools:
        rows = [r for r in results if (r["tool"], r["precision"]) == (tool, precision)]
        medians[tool] = statistics.median(r["map50_95"] for r in rows)
        collapses = [r["collapse"] for r in rows if r["collapse"] is not None]
        floored = [r["collapse_from_005"] for r in rows if r.get("collapse_from_005") is not None]
        per_seed = " / ".join(f"{r['map50_95']:.3f}" for r in rows)
        print(f"| {tool} | {precision} | {statistics.median(r['images_seen'] for r in rows):,.0f} | "
              f"{statistics.median(r['wall_s'] for r in rows):.0f} | {per_seed} | **{medians[tool]:.3f}** | "
              f"{min(collapses) if collapses else '-'} | {min(floored) if floored else '-'} |")
    if "detpact" in medians and "yolo11n" in medians and medians["yolo11n"] > 0:
        print(f"\nratio detpact / yolo11n (median map50_95): {medians['detpact'] / medians['yolo11n']:.3f}")


if __name__ == "__main__":
    main()
