"""What a finished task hands to the next: `checkpoints/continual.pt` (train.continual.save_state).

{"format_version", "kind": "detpact.continual",
 "anchor": {parameter name: tensor}  the weights of the run's best.pt that evaluation and export
                                    use (the EMA's when evaluated): the task's model,
 "ewc":    {"fisher": {name: tensor}}  gamma x the previous Fisher + this run's,
 "si":     {"importance": {name: tensor}} or None  the previous importance + this run's,
 "derpp":  the reservoir buffer (derpp.py) or None}
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detpact.config.continual import ContinualConfig
from detpact.engine.penalties import STATE_KIND, Penalties, load_previous
from detpact.engine.penalties.ewc import estimate_fisher
from detpact.run.checkpoint import FORMAT_VERSION, inference_state_dict, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def save_continual_state(path: Path, cfg: ContinualConfig, penalties: Penalties | None, model: nn.Module,
                         criterion: Any, batches: Iterable, device: torch.device, amp: str,
                         channels_last: bool, weights: Path | None = None) -> None:
    """Estimate the Fisher of `model` (the run's inference model, with the inference
    weights of checkpoint `weights` when given: its best.pt) on `batches` (the task's
    training images, unaugmented) with `criterion` (one without collectives), fold in the
    previous task's state (`cfg.previous`) and write it all atomically to `path`."""
    previous = load_previous(cfg.previous) if cfg.previous else {}
    if weights is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(inference_state_dict(load_checkpoint(weights)))
    fisher = estimate_fisher(model, criterion, batches, cfg.ewc.fisher_batches, device, amp, channels_last)
    if previous.get("ewc"):  # online EWC: the older tasks' Fisher decays by gamma
        fisher = {n: cfg.ewc.gamma * previous["ewc"]["fisher"][n] + f if n in previous["ewc"]["fisher"] else f
                  for n, f in fisher.items()}
    si = penalties.get("si") if penalties is not None else None
    importance = si.run_importance() if si is not None and si.track else None
    if importance is not None and previous.get("si"):  # the tasks' importances add up
        importance = {n: previous["si"]["importance"][n] + w if n in previous["si"]["importance"] else w
                      for n, w in importance.items()}
    derpp = penalties.get("derpp") if penalties is not None else None
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "kind": STATE_KIND,
        "anchor": {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()},
        "ewc": {"fisher": fisher},
        "si": {"importance": importance} if importance is not None else None,
        "derpp": derpp.buffer_state() if derpp is not None else None,
    }
    save_checkpoint(path, state)
    log.info("continual state for the next task written to %s (%s)", path,
             ", ".join(k for k in ("ewc", "si", "derpp") if state[k] is not None))
