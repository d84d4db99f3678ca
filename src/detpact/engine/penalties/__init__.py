"""Continual-learning penalties: terms added to the criterion's loss so that fine-tuning on
a new task keeps what a previous one taught (docs/adaptation.md, "Continual learning").

distill.py: self-distillation from a teacher checkpoint ("loss_distill").
derpp.py:   DER++ replay of a reservoir buffer ("loss_derpp_logits", "loss_derpp_labels").
ewc.py:     Elastic Weight Consolidation ("loss_ewc"), and the end-of-run Fisher.
si.py:      Synaptic Intelligence ("loss_si"), its path integral tracked step by step.

Every penalty has the same small interface (`Penalty`): `losses(model, images, targets,
outputs)` -> {"loss_<name>": weighted scalar tensor} on each micro-batch, after the
criterion (float32, outside autocast; `images` are the model's input pixels, `outputs` its
DetectorOutput); `after_step(model)` after each optimizer step that was taken; and
`state_dict()` / `load_state_dict()`, which go into the checkpoint bundle under
"continual" so that a resume is exact. `train_step` adds the losses to the one it
back-propagates and logs each as its own component.

What a task leaves for the next (EWC's Fisher, SI's importance, DER++'s buffer, with the
weights they anchor to) is written at the end of its run to `checkpoints/continual.pt`
(`train.continual.save_state`) and named by the next run (`train.continual.previous`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from detpact.config.continual import ContinualConfig
from detpact.errors import DetpactError
from detpact.run.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

STATE_KIND = "detpact.continual"  # what a continual.pt says it is


class Penalty(Protocol):
    def losses(self, model: nn.Module, images: Tensor, targets: list[dict], outputs: Any) -> dict[str, Tensor]: ...

    def after_step(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Penalties:
    """The run's penalties by name (distill, derpp, ewc, si: that order, the order their
    losses are added in)."""

    items: dict[str, Penalty]

    def losses(self, model: nn.Module, images: Tensor, targets: list[dict], outputs: Any) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for penalty in self.items.values():
            terms.update(penalty.losses(model, images, targets, outputs))
        return terms

    def after_step(self, model: nn.Module) -> None:
        for penalty in self.items.values():
            penalty.after_step(model)

    def state_dict(self) -> dict[str, Any]:
        return {name: penalty.state_dict() for name, penalty in self.items.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        missing = sorted(set(self.items) - set(state or {}))
        if missing:
            raise DetpactError(f"Cannot resume: the checkpoint holds no state of the continual penalties {missing} "
                               "(train.continual changed since the run started). Resume with the settings it "
                               "started with.")
        try:
            for name, penalty in self.items.items():
                penalty.load_state_dict(state[name])
        except (KeyError, RuntimeError) as exc:
            raise DetpactError(f"Cannot resume: the checkpoint's state of the continual penalties does not fit "
                               f"this run ({str(exc).strip().splitlines()[0]}). Resume with the model and "
                               "train.continual settings the run started with.") from None

    def get(self, name: str) -> Penalty | None:
        return self.items.get(name)


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters by name (what the penalties weigh and anchor)."""
    return dict(model.named_parameters())


def load_previous(path: str) -> dict[str, Any]:
    """The continual state another run wrote (`train.continual.previous`)."""
    state = load_checkpoint(Path(path))
    if state.get("kind") != STATE_KIND:
        raise DetpactError(f"train.continual.previous: {path} is not a continual state file. Name the "
                           "checkpoints/continual.pt that the previous task's run wrote with "
                           "train.continual.save_state: true.")
    return state


def require(previous: dict[str, Any] | None, part: str, key: str) -> Any:
    """`previous[part]`, or an error saying which setting needs it."""
    if previous is None or previous.get(part) is None:
        source = "no train.continual.previous is set" if previous is None else "the previous run did not save it"
        raise DetpactError(f"train.continual.{key} needs the previous task's {part} state, but {source}. Train "
                           "the previous task with train.continual.save_state: true and name its "
                           "checkpoints/continual.pt in train.continual.previous.")
    return previous[part]


def check_shapes(params: dict[str, Tensor], tensors: dict[str, Tensor], what: str) -> None:
    """Every tensor of `tensors` names a parameter of the same shape."""
    wrong = [n for n, t in tensors.items() if n not in params or params[n].shape != t.shape]
    if wrong:
        raise DetpactError(f"train.continual.previous: the {what} does not fit this model ({len(wrong)} tensors, "
                           f"e.g. {wrong[0]}). The previous task must have trained the same architecture and "
                           "class count.")


def build_penalties(cfg: ContinualConfig, model: nn.Module, criterion: Any, device: torch.device, amp: str,
                    seed: int = 0, multi_scale: bool = False, world_size: int = 1) -> Penalties | None:
    """The penalties `cfg` turns on (None when none is); `model` is the student, built and
    on `device`, with its starting weights; `criterion` gives DER++'s label term, `seed`
    its random stream."""
    from detpact.engine.penalties.distill import SelfDistill
    from detpact.engine.penalties.ewc import EWC
    from detpact.engine.penalties.si import SI

    previous = load_previous(cfg.previous) if cfg.previous else None
    items: dict[str, Penalty] = {}
    sd = cfg.self_distill
    if sd.teacher is not None and sd.weight > 0:
        items["distill"] = SelfDistill.from_checkpoint(sd, device, amp)
    if cfg.derpp.buffer_size > 0 or cfg.derpp.alpha > 0 or cfg.derpp.beta > 0:
        items["derpp"] = _derpp(cfg, previous, criterion, device, amp, seed, multi_scale, world_size)
    if cfg.ewc.weight > 0:
        fisher = require(previous, "ewc", "ewc.weight")["fisher"]
        items["ewc"] = EWC(cfg.ewc.weight, fisher, previous["anchor"], model, device)
    if cfg.si.c > 0 or cfg.save_state:  # the path integral is tracked for the next task
        importance = require(previous, "si", "si.c")["importance"] if cfg.si.c > 0 else None
        items["si"] = SI(cfg.si, model, device, track=cfg.save_state, importance=importance,
                         anchor=previous["anchor"] if importance is not None else None)
    return Penalties(items) if items else None


def _derpp(cfg: ContinualConfig, previous: dict[str, Any] | None, criterion: Any, device: torch.device, amp: str,
           seed: int, multi_scale: bool, world_size: int) -> Penalty:
    from detpact.engine.penalties.derpp import DerppReplay

    if cfg.derpp.buffer_size == 0:
        raise DetpactError("train.continual.derpp.alpha/beta replay a buffer: set train.continual.derpp.buffer_size "
                           "above 0 (e.g. 200).")
    if multi_scale:
        raise DetpactError("train.continual.derpp keeps images of one size: turn data.multi_scale off with it.")
    if world_size > 1:
        # Each process would keep its own buffer, and only rank 0's is checkpointed: a resume
        # could not be exact.
        raise DetpactError("train.continual.derpp runs in one process only (its buffer is not shared between "
                           "torchrun processes): train without torchrun, or turn derpp off.")
    buffer = previous.get("derpp") if previous is not None else None  # the reservoir goes on from the tasks before
    if buffer is None and (cfg.derpp.alpha > 0 or cfg.derpp.beta > 0):
        log.warning("train.continual.derpp: no previous task's buffer (train.continual.previous%s): this run "
                    "replays only its own samples", " holds none" if previous is not None else " is not set")
    return DerppReplay(cfg.derpp, criterion, device, amp, seed, buffer)
