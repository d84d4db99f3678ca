"""`detpact lora merge RUN --out PATH`: a LoRA run's checkpoint as a plain checkpoint.

The adapters of the raw and the EMA weights are folded into the base weights (as
inference does: inference/predictor.py `float_model`; over a quantised base, into the
float values of its quantised weights), the embedded config gets `train.lora.r: 0` (and
`train.quant: none`), and the optimizer state (of the adapters) is left out: the result
loads like the checkpoint of a run trained without adapters (load_detector), for
evaluation, prediction or as the starting weights of another run (`model.init_from`).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detpact.commands.runs import CHECKPOINT_CHOICES, checkpoint_path, open_run
from detpact.config import validate_config
from detpact.config.load import config_hash
from detpact.errors import DetpactError
from detpact.inference.predictor import float_model
from detpact.models.lora import lora_scale
from detpact.run.checkpoint import load_checkpoint, save_checkpoint


def add_parser(commands: argparse._SubParsersAction) -> None:
    lora = commands.add_parser("lora", help="LoRA adapters of a run trained with train.lora")
    verbs = lora.add_subparsers(dest="lora_command", required=True)
    merge = verbs.add_parser("merge", help="fold a run's adapters into its base weights: a plain checkpoint")
    merge.add_argument("run_dir", metavar="RUN", help="run folder trained with train.lora, e.g. runs/exp01")
    merge.add_argument("--out", required=True, metavar="PATH", help="the merged checkpoint to write (.pt)")
    merge.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                       help="which checkpoint of the run (default best)")


def run(args: argparse.Namespace) -> int:
    report = merge_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(f"merged the LoRA adapters of {report['layers']} layers (scale {report['scale']:g}) of "
          f"{report['source']} -> {report['out']}")
    return 0


def merge_run(run_dir: str | Path, out: str | Path, *, checkpoint: str = "best",
              environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the merged, plain checkpoint of a LoRA run to `out`; returns what was merged."""
    run = open_run(run_dir, environ)
    source = checkpoint_path(run, checkpoint)
    out = Path(out)
    if out.suffix != ".pt" or out.is_dir():
        raise DetpactError(f"--out {out}: name the checkpoint file to write, ending in .pt (e.g. merged.pt).")
    if out.resolve().parent == run.checkpoints.resolve():
        raise DetpactError(f"--out {out} is inside the run's checkpoints/ folder, which the run manages: write the "
                           "merged checkpoint elsewhere.")
    if not out.parent.is_dir():
        raise DetpactError(f"--out {out}: the folder {out.parent} does not exist. Create it first.")
    bundle = load_checkpoint(source)
    merged = merge_bundle(bundle, str(source))
    save_checkpoint(out, merged)
    return {"source": str(source), "out": str(out), **merged["lora_merged"]}


def merge_bundle(bundle: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of `bundle` with plain, merged weights and LoRA off in its config."""
    cfg = validate_config(bundle["config"], source=f"{source} (embedded config)")
    lora = cfg.train.lora
    if not lora.r:
        raise DetpactError(f"{source} was trained without LoRA adapters (train.lora.r is 0): there is nothing to "
                           "merge; use the checkpoint as it is.")
    scale = lora_scale(lora)
    config = copy.deepcopy(bundle["config"])
    config["train"]["lora"]["r"] = 0
    config["train"].update(quant="none", qlora=False)  # the quantised weights' float values are now the weights

    def plain(state: dict[str, Any]) -> dict[str, Any]:
        return float_model(cfg, len(bundle["class_names"]), state, bundle).state_dict()

    weights = bundle.get("weights") or {}
    merged = {**bundle, "model": plain(bundle["model"]), "optimizer": None, "config": config,
              "config_hash": config_hash(config), "weights": {**weights, "quant": None}}
    if bundle.get("ema"):
        merged["ema"] = {**bundle["ema"], "module": plain(bundle["ema"]["module"])}
    layers = sum(key.endswith(".lora_a") for key in bundle["model"])
    merged["lora_merged"] = {"from": source, "layers": layers, "scale": scale, "config_hash": bundle["config_hash"],
                             "quant": weights.get("quant")}
    return merged
