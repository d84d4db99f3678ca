"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), online (Schwarz et al., 2018).

loss_ewc = lambda / 2 x sum_k F_k (theta_k - theta*_k)^2

F is the previous task's Fisher information and theta* its best.pt weights, both read from
its continual.pt. A run with `save_state` estimates its own Fisher at its end (the batch
empirical Fisher: the squared gradient of the detection loss, averaged over
`fisher_batches` unaugmented training batches) and saves gamma x F_previous + F_own with
its own best.pt weights as the new anchor.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from detpact.engine.evaluate import prepare_images
from detpact.engine.penalties import check_shapes, parameters_of
from detpact.engine.runtime import autocast


def quadratic(params: dict[str, Tensor], importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """sum_k importance_k (params_k - anchor_k)^2 over the names of `importance` (in its order)."""
    total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
    for name, weight in importance.items():
        total = total + (weight * (params[name].float() - anchor[name]) ** 2).sum()
    return total


def _on(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {n: t.detach().to(device, torch.float32).clone() for n, t in tensors.items()}


class EWC:
    """The EWC penalty; its state is the Fisher and anchor it holds to."""

    def __init__(self, weight: float, fisher: dict[str, Tensor], anchor: dict[str, Tensor], model: nn.Module,
                 device: torch.device):
        params = parameters_of(model)
        check_shapes(params, fisher, "EWC Fisher")
        check_shapes(params, anchor, "anchor weights")
        self.weight = weight
        self.fisher = _on(fisher, device)
        self.anchor = _on({n: anchor[n] for n in fisher}, device)

    def losses(self, model: nn.Module, images: Tensor, targets: list[dict], outputs: Any) -> dict[str, Tensor]:
        return {"loss_ewc": self.weight / 2 * quadratic(parameters_of(model), self.fisher, self.anchor)}

    def after_step(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": {n: t.cpu() for n, t in self.fisher.items()},
                "anchor": {n: t.cpu() for n, t in self.anchor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mine, theirs in ((self.fisher, state["fisher"]), (self.anchor, state["anchor"])):
            for name, tensor in mine.items():
                tensor.copy_(theirs[name])


def estimate_fisher(model: nn.Module, criterion: Any, batches: Iterable, count: int, device: torch.device,
                    amp: str, channels_last: bool) -> dict[str, Tensor]:
    """The batch empirical Fisher of `model`'s detection loss: the squared gradient of
    `criterion(...)["loss"]` per batch, averaged over the first `count` of `batches`
    (images, targets). A copy of the model is used, in train mode (as the loss is defined),
    so the model's BatchNorm statistics are left as they are."""
    probe = copy.deepcopy(model).train().requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in probe.named_parameters()}
    used = 0
    for images, targets in batches:
        if used == count:
            break
        probe.zero_grad(set_to_none=True)
        with autocast(device, amp):
            outputs = probe(prepare_images(images, device, channels_last), targets)
        criterion(outputs, targets)["loss"].backward()
        for name, param in probe.named_parameters():
            if param.grad is not None:
                fisher[name] += param.grad.float() ** 2
        used += 1
    return {n: (f / max(used, 1)).cpu() for n, f in fisher.items()}
