"""Where task A's accuracy went in a continual benchmark: BatchNorm statistics vs weights.

BatchNorm's running mean and variance are buffers, not parameters: no optimizer, adapter
or parameter penalty (EWC, SI, a frozen LoRA base) holds them, and every training forward
pass moves them towards the new domain's statistics. This evaluates each task-B run's
best.pt on domain A's val split twice: as it is, and with the BatchNorm running
statistics of task A's best.pt put back (every other tensor kept).

    .venv/bin/python bench/continual_bn.py OUT      # OUT: the --out folder of bench/continual.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from detpact.commands.evaluate import dataset_config, other_data, predict_as_trained
from detpact.commands.runs import cache_dir, checkpoint_path, open_run
from detpact.engine.evaluate import score
from detpact.inference.predictor import load_detector


def norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(module, key) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) for key in ("running_mean", "running_var")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the --out folder of bench/continual.py")
    args = parser.parse_args()
    config_a = args.out / "configs" / "task_a.yaml"
    run_a = open_run(args.out / "runs" / "task_a", None)
    stats_a = {k: v.clone() for k, v in norm_buffers(load_detector(checkpoint_path(run_a, "best")).model).items()}
    rows = []
    for folder in sorted((args.out / "runs").glob("task_b_*")):
        run = open_run(folder, None)
        loaded = load_detector(checkpoint_path(run, "best"))
        cfg = loaded.config
        splits = other_data(loaded.class_names, dataset_config(config_a, cfg.data.image_size), cache_dir(None), config_a)
        maps = []
        for restore in (False, True):
            if restore:
                buffers = norm_buffers(loaded.model)
                drift = sum(float((buffers[k].float() - stats_a[k].float()).abs().mean()) for k in buffers) / len(buffers)
                with torch.no_grad():
                    for key, tensor in buffers.items():
                        tensor.copy_(stats_a[key])
            detections = predict_as_trained(run, loaded, splits.val)
            metrics = score(splits.val, detections, splits.class_names, cfg.model.postprocess.max_det, cfg.eval)
            maps.append((metrics["map50_95"], metrics["map50"]))
        rows.append({"method": folder.name.removeprefix("task_b_"), "as_is": maps[0], "bn_of_a": maps[1],
                     "bn_drift": drift})
    print("| method | A mAP50-95 / mAP50 after B | with task A's BN statistics | mean abs BN buffer change |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['as_is'][0]:.3f} / {row['as_is'][1]:.3f} | "
              f"{row['bn_of_a'][0]:.3f} / {row['bn_of_a'][1]:.3f} | {row['bn_drift']:.3g} |")
    (args.out / "bn_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
