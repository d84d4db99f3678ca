"""Exponential moving average of the model weights, with a warm-up ramp."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from detpact.config import EMAConfig


class ModelEMA:
    """Keeps `module`, an EMA copy of a model, used for validation, best.pt and export.

    decay(updates) = decay * (1 - exp(-updates / warmup_steps)): early on the EMA
    follows the model closely, later it averages over ~1 / (1 - decay) steps.
    Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = cfg.decay
        self.warmup_steps = cfg.warmup_steps
        self.updates = 0
        self._ema_params = list(self.module.parameters())
        self._ema_buffers = list(self.module.buffers())

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self._ema_params, params, 1.0 - d)
        for ema_buf, buf in zip(self._ema_buffers, model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
