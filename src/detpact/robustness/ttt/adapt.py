"""What test-time training adapts and minimises: the norm layers' affine parameters, and
the Tent and MIM objectives.

Pure functions over a model (already a private copy: nothing here copies it) and tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from detpact.models.mim import patch_mask, reconstruction_loss

NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def configure_norms(model: nn.Module, scope: nn.Module) -> dict[str, nn.Parameter]:
    """Make `model` ready for test-time training and return the parameters it adapts.

    Every parameter stops requiring gradients except the weight and bias of the norm
    layers inside `scope` (the whole model for Tent, the backbone for MIM). Every BatchNorm
    layer of the model normalises with the statistics of the test batch, never updating
    its running statistics; the rest of the model stays in eval mode (no dropout).
    """
    model.eval().requires_grad_(False)
    for layer in model.modules():
        if isinstance(layer, _BatchNorm):
            layer.train()
            layer.track_running_stats = False
            # Without running statistics F.batch_norm uses the batch's, in train and eval mode alike.
            layer.running_mean, layer.running_var = None, None
    params = {}
    scope_ids = {id(m) for m in scope.modules()}
    for name, layer in model.named_modules():
        if isinstance(layer, NORM_TYPES) and id(layer) in scope_ids:
            for kind in ("weight", "bias"):
                param = getattr(layer, kind, None)
                if isinstance(param, nn.Parameter):
                    param.requires_grad_(True)
                    params[f"{name}.{kind}"] = param
    return params


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def restore(params: dict[str, nn.Parameter], saved: dict[str, Tensor]) -> None:
    for name, p in params.items():
        p.copy_(saved[name])


@torch.no_grad()
def relative_drift(params: dict[str, nn.Parameter], original: dict[str, Tensor]) -> float:
    """||theta - theta_0|| / ||theta_0|| over all adapted parameters together (L2)."""
    moved = sum(float((p.float() - original[n].float()).square().sum()) for n, p in params.items())
    size = sum(float(original[n].float().square().sum()) for n in params)
    return math.sqrt(moved / max(size, 1e-12))


def binary_entropy(p: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(p), 0 at p = 0 and 1."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def confident_entropy(cls_logits: Tensor, confidence: float) -> tuple[Tensor, int]:
    """Tent's objective for per-class sigmoid heads: the mean binary entropy of the top-class
    score over the confident candidates (top score >= `confidence`), and their count.

    cls_logits: [B, N, C]. With no confident candidate the loss is a zero that still
    depends on the logits (so that backward is valid) and the count is 0.
    """
    top = cls_logits.float().sigmoid().amax(dim=-1)  # [B, N]
    keep = top >= confidence
    count = int(keep.sum())
    if count == 0:
        return cls_logits.float().sum() * 0.0, 0
    return binary_entropy(top[keep]).mean(), count


def mim_loss(model: nn.Module, images: Tensor, generator_seed: int) -> Tensor:
    """The masked-image reconstruction loss of `images` [B, 3, H, W] in [0, 1], the mask
    drawn from `generator_seed` (the same seed gives the same mask)."""
    generator = torch.Generator().manual_seed(generator_seed)
    mask = patch_mask(images.shape[0], images.shape[2], images.shape[3], generator, images.device)
    return reconstruction_loss(model.backbone, model.mim_decoder, images, mask)
