"""What test-time training adapts and minimises: the norm layers' affine parameters, and
the Tent and MIM objectives.

Pure functions over a model (already a private copy: nothing here copies it) and tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from detpact.models.mim import patch_mask, reconstruction_loss

NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


class BlendedBatchNorm(nn.Module):
    """A BatchNorm layer that normalises with a blend of the test batch's statistics and the
    training (running) ones, weighted by how far the batch has shifted.

    Per channel c, d_c is the symmetric KL divergence between N(batch mean, batch var) and
    N(running mean, running var), averaged over both directions; d is its mean over the
    channels. The layer normalises with

        w * running + (1 - w) * batch   (means and variances),   w = exp(-d / shift_scale)

    so a batch that looks like the training data keeps the training statistics (whose
    estimate does not depend on which 16 images share the batch), and a shifted one takes
    its own. w is not differentiated: Tent's gradient flows through the batch statistics.
    The affine weight and bias are the wrapped layer's own Parameters.
    """

    def __init__(self, layer: _BatchNorm, shift_scale: float):
        super().__init__()
        self.weight, self.bias, self.eps, self.shift_scale = layer.weight, layer.bias, layer.eps, shift_scale
        self.register_buffer("source_mean", layer.running_mean.detach().float().clone())
        self.register_buffer("source_var", layer.running_var.detach().float().clone())
        self.last_weight = torch.tensor(float("nan"))  # w of the latest batch (tests, diagnostics)

    def forward(self, x: Tensor) -> Tensor:
        values = x.float()
        # Channels last as a [pixels, channels] view (a copy for NCHW input): torch.var_mean over
        # dims (0, 2, 3) takes ~20x longer on CPU than these two means.
        flat = values.movedim(1, -1).reshape(-1, values.shape[1])
        batch_mean = flat.mean(0)
        batch_var = (flat - batch_mean).square().mean(0) + self.eps
        source_mean, source_var = self.source_mean, self.source_var + self.eps
        with torch.no_grad():
            gap = (batch_mean - source_mean).square()
            divergence = 0.25 * ((batch_var + gap) / source_var + (source_var + gap) / batch_var - 2)
            w = torch.exp(-divergence.mean() / self.shift_scale)
        self.last_weight = w  # a tensor: reading it (float()) would wait for the device at every layer
        mean = w * source_mean + (1 - w) * batch_mean
        if not (torch.is_grad_enabled() and x.requires_grad):  # no gradient through the statistics: fused kernel
            var = w * self.source_var + (1 - w) * (batch_var - self.eps)
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        scale = torch.rsqrt(w * source_var + (1 - w) * batch_var)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale if self.bias is None else self.bias.float() - mean * scale
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return torch.addcmul(shift.view(shape), values, scale.view(shape)).to(x.dtype)


def configure_norms(model: nn.Module, scope: nn.Module, shift_scale: float | None = None) -> dict[str, nn.Parameter]:
    """Make `model` ready for test-time training and return the parameters it adapts.

    Every parameter stops requiring gradients except the weight and bias of the norm
    layers inside `scope` (the whole model for Tent, the backbone for MIM). Every BatchNorm
    layer of the model normalises with the statistics of the test batch (`shift_scale`
    None), or is replaced by a BlendedBatchNorm that blends them with its running ones; its
    running statistics are never updated. The rest of the model stays in eval mode (no
    dropout).
    """
    model.eval().requires_grad_(False)
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, _BatchNorm):
            continue
        if shift_scale is not None and layer.running_mean is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, BlendedBatchNorm(layer, shift_scale))
        else:
            layer.train()
            layer.track_running_stats = False
            # Without running statistics F.batch_norm uses the batch's, in train and eval mode alike.
            layer.running_mean, layer.running_var = None, None
    params = {}
    scope_ids = {id(m) for m in scope.modules()}
    for name, layer in model.named_modules():
        if isinstance(layer, (*NORM_TYPES, BlendedBatchNorm)) and id(layer) in scope_ids:
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
