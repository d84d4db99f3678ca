"""Train Ultralytics YOLO11n from scratch and write its validation predictions (run by bench/peer.py).

This script runs in the peer venv (.venv-peer: torch, torchvision, ultralytics), never
in detpact's: it imports nothing from detpact. Ultralytics cannot reach the internet
here, so nothing may be downloaded: no pretrained weights, fonts or AMP check models.

    .venv-peer/bin/python bench/peer_yolo.py --data D/dataset.yaml --val-list D/val.txt \\
        --epochs 36 --seed 0 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Ultralytics dataset YAML")
    parser.add_argument("--val-list", required=True, help="text file: one validation image path per line")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--out", required=True, help="folder for the run and predictions.json")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(out / "config"))
    import torch
    from ultralytics import YOLO
    from ultralytics.utils import torch_utils

    # Ultralytics trains on the CPU with cpu_count - 1 threads (1 on a 2-core machine):
    # give it the same thread count as detpact.
    torch_utils.NUM_THREADS = args.threads
    model = YOLO(args.model)
    started = time.perf_counter()
    model.train(data=args.data, epochs=args.epochs, batch=args.batch, imgsz=args.imgsz, device="cpu",
                workers=args.workers, seed=args.seed, deterministic=True, pretrained=False, amp=False,
                plots=False, val=False, cache="ram", project=str(out), name="train", exist_ok=True, verbose=False)
    train_seconds = time.perf_counter() - started

    model = YOLO(out / "train" / "weights" / "last.pt")  # the final checkpoint (its EMA weights)
    images = Path(args.val_list).read_text().split()
    records = []
    for result in model.predict(images, imgsz=args.imgsz, conf=0.001, iou=0.7, max_det=100, device="cpu",
                                verbose=False, stream=True):
        boxes = result.boxes
        records.append({"image": result.path, "boxes_xyxy": boxes.xyxy.tolist(), "scores": boxes.conf.tolist(),
                        "labels": [int(c) for c in boxes.cls.tolist()]})
    params = sum(p.numel() for p in model.model.parameters())
    (out / "predictions.json").write_text(json.dumps({
        "tool": f"ultralytics {__import__('ultralytics').__version__} {args.model}", "epochs": args.epochs,
        "seed": args.seed, "train_seconds": train_seconds, "num_params": params, "threads": torch.get_num_threads(),
        "predictions": records}))


if __name__ == "__main__":
    main()
