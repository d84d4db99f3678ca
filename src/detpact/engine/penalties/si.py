"""Synaptic Intelligence (Zenke, Poole and Ganguli, 2017).

While a task trains, each parameter's path integral is accumulated after every optimizer
step: omega_k += -g_k x (theta_k(after) - theta_k(before)), g the step's gradient as the
optimizer applied it (accumulated, clipped, unscaled; the penalties' own share included).
At the end of the run (`save_state`) its importance is
    Omega_k = max(omega_k, 0) / ((theta_k(end) - theta_k(start))^2 + epsilon)
added to the previous tasks' (continual.pt). The next task pays
    loss_si = c x sum_k Omega_k (theta_k - theta*_k)^2
with theta* the weights of the previous task's best.pt (the anchor in continual.pt).
A negative omega (a parameter the steps moved uphill overall) counts as no importance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from detpact.config.continual import SIConfig
from detpact.engine.penalties import check_shapes, parameters_of
from detpact.engine.penalties.ewc import quadratic


def _copy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().float().clone() for n, t in tensors.items()}


class SI:
    """The SI penalty (with `c` > 0 and a previous importance) and the path-integral tracker
    (with `track`); its state is both."""

    def __init__(self, cfg: SIConfig, model: nn.Module, device: torch.device, track: bool,
                 importance: dict[str, Tensor] | None = None, anchor: dict[str, Tensor] | None = None):
        self.cfg, self.track = cfg, track
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if track else {}
        self.start = _copy(params) if track else {}
        self.last = _copy(params) if track else {}
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        if importance is not None and anchor is not None:
            all_params = parameters_of(model)
            check_shapes(all_params, importance, "SI importance")
            check_shapes(all_params, anchor, "anchor weights")
            self.importance = {n: t.to(device, torch.float32).clone() for n, t in importance.items()}
            self.anchor = {n: anchor[n].to(device, torch.float32).clone() for n in importance}

    def losses(self, model: nn.Module, images: Tensor, targets: list[dict], outputs: Any) -> dict[str, Tensor]:
        if self.cfg.c <= 0 or not self.importance:
            return {}
        return {"loss_si": self.cfg.c * quadratic(parameters_of(model), self.importance, self.anchor)}

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if not self.track:
            return
        for name, param in model.named_parameters():
            if name not in self.omega:
                continue
            now = param.detach().float()
            if param.grad is not None:
                self.omega[name] -= param.grad.float() * (now - self.last[name])
            self.last[name].copy_(now)

    def run_importance(self) -> dict[str, Tensor]:
        """This run's Omega (see the module's docstring), on the CPU."""
        return {n: (w.clamp(min=0) / ((self.last[n] - self.start[n]) ** 2 + self.cfg.epsilon)).cpu()
                for n, w in self.omega.items()}

    def state_dict(self) -> dict[str, Any]:
        def cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t.cpu() for n, t in tensors.items()}

        return {"omega": cpu(self.omega), "start": cpu(self.start), "last": cpu(self.last),
                "importance": cpu(self.importance), "anchor": cpu(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("omega", "start", "last", "importance", "anchor"):
            mine, theirs = getattr(self, key), state[key]
            if set(mine) != set(theirs):
                raise KeyError(f"SI {key}: the checkpoint's parameters differ from the model's")
            for name, tensor in mine.items():
                tensor.copy_(theirs[name])
