"""Low-rank adapters (LoRA) on the Linear and 1x1 Conv2d layers of a detector.

An adapted layer computes `base(x) + (alpha / r) * B(A(dropout(x)))`: A [r, in] starts
random, B [out, r] at zero, so an adapted model starts out equal to its base. The wrappers
keep the base layer's parameter names (`<layer>.weight`, `<layer>.bias`) and add
`<layer>.lora_a` and `<layer>.lora_b`, so a checkpoint of an adapted model is the base
model's state dict plus the adapters, and merging (`W + scale * B @ A`) gives back a plain
state dict. Our own module, not peft: see README's library table for why.
"""

from __future__ import annotations

import logging
import math
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.config.train import LoRAConfig
from detpact.errors import DetpactError
from detpact.models.quant import QuantisedLinear

log = logging.getLogger(__name__)

ADAPTER_KEYS = ("lora_a", "lora_b")


class LoRALayer(nn.Module):
    """A Linear or ungrouped 1x1 Conv2d with a low-rank adapter beside it.

    weight/bias are the base layer's own Parameters (moved over, not copied). lora_a has
    the base weight's layout with `r` outputs ([r, in] or [r, in, 1, 1]), lora_b [out, r]
    (or [out, r, 1, 1]); A runs with the base conv's stride and padding, B as a plain 1x1.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d | QuantisedLinear, r: int, scale: float, dropout: float):
        super().__init__()
        self.conv = isinstance(base, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        # Over a quantised base (QLoRA) the layer computes with the base's frozen quantised
        # weight and saves its float base as `weight`; it is kept out of the submodules so that
        # the state dict's keys stay those of a plain adapted layer.
        self.__dict__["quantised"] = base if isinstance(base, QuantisedLinear) else None
        self.weight = None if self.quantised is not None else base.weight
        self.bias = base.bias
        self.scale = scale
        base_weight = self.quantised.base if self.quantised is not None else base.weight
        out_features, in_features = base_weight.shape[:2]
        tail = (1, 1) if self.conv else ()
        device = self.quantised.qweight.device if self.quantised is not None else base_weight.device
        factory = {"device": device, "dtype": base_weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(r, in_features, *tail, **factory))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, *tail, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.conv:
            base = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            low = F.conv2d(self.dropout(x), self.lora_a, None, self.stride, self.padding, self.dilation)
            return base + self.scale * F.conv2d(low, self.lora_b)
        base = self.quantised(x) if self.quantised is not None else F.linear(x, self.weight, self.bias)
        return base + self.scale * F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)

    def base_weight(self) -> Tensor:
        """The weight the base path computes with: the float values of a quantised base's
        weight, else the base layer's own weight."""
        return self.quantised.dequantised() if self.quantised is not None else self.weight

    def merged(self) -> nn.Linear | nn.Conv2d:
        """The plain float layer with the adapter folded into its weight (over a quantised
        base: into the float values of its quantised weight)."""
        weight = self.base_weight()
        out_features, in_features = weight.shape[:2]
        bias = self.bias is not None
        factory = {"device": self.lora_a.device, "dtype": weight.dtype}
        layer = (nn.Conv2d(in_features, out_features, 1, self.stride, self.padding, self.dilation, bias=bias, **factory)
                 if self.conv else nn.Linear(in_features, out_features, bias=bias, **factory))
        with torch.no_grad():
            layer.weight.copy_(merge_weight(weight.to(self.lora_a.device), self.lora_a, self.lora_b, self.scale))
            if bias:
                layer.bias.copy_(self.bias)
        layer.weight.requires_grad_(self.weight is not None and self.weight.requires_grad)
        return layer

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.quantised is not None:
            self.quantised.save_base(destination, prefix)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if self.quantised is not None:
            state_dict = self.quantised.load_base(state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        kind = "conv1x1" if self.conv else "linear"
        out_features, in_features = self.lora_b.shape[0], self.lora_a.shape[1]
        quant = f", base={self.quantised.mode}" if self.quantised is not None else ""
        return f"{kind}, in={in_features}, out={out_features}, r={self.lora_a.shape[0]}, scale={self.scale:g}{quant}"


def merge_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """`weight + scale * B @ A`, in the weight's layout ([out, in] or [out, in, 1, 1])."""
    delta = lora_b.flatten(1).double() @ lora_a.flatten(1).double()  # [out, in]; fp64 so that merging adds no error
    return (weight.double() + scale * delta.view_as(weight)).to(weight.dtype)


def lora_scale(cfg: LoRAConfig) -> float:
    return (cfg.alpha if cfg.alpha is not None else cfg.r) / cfg.r


def target_layers(model: nn.Module, target: str) -> list[str]:
    """Names of the layers `target` adapts (see LoRAConfig.target), in module order."""
    attention = {f"{name}.{child}" for name, module in model.named_modules()
                 if isinstance(module, nn.MultiheadAttention) for child, _ in module.named_children()}
    linear = target in ("all_linear", "all_linear_conv1x1", "head")
    conv = target in ("all_conv1x1", "all_linear_conv1x1", "head")
    names = []
    for name, module in model.named_modules():
        if target == "head" and not name.startswith("head."):
            continue
        if isinstance(module, (nn.Linear, QuantisedLinear)) and linear and name not in attention:
            names.append(name)
        elif isinstance(module, nn.Conv2d) and conv and module.kernel_size == (1, 1) and module.groups == 1 \
                and module.padding_mode == "zeros":
            names.append(name)
    return names


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> dict[str, Any]:
    """Wrap the `cfg.target` layers of `model` in place; with `freeze_base`, only the
    adapters (and, per `train_bias`, the biases) keep requires_grad. Call after the starting
    weights are loaded and before the optimizer and EMA take the parameters.

    Returns the record kept in the run's `weights` entry: target, rank, scale, the adapted
    layers and the adapter, base and trainable parameter counts.
    """
    names = target_layers(model, cfg.target)
    if not names:
        raise DetpactError(f"train.lora.target: {cfg.target} finds no layer to adapt in this model (no "
                           "Linear or 1x1 Conv2d there). Pick another target, e.g. all_linear_conv1x1.")
    base_params = sum(p.numel() for p in model.parameters())
    scale = lora_scale(cfg)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALayer(getattr(owner, child), cfg.r, scale, cfg.dropout))
    if cfg.freeze_base:
        for pname, param in model.named_parameters():
            leaf = pname.rpartition(".")[2]
            param.requires_grad_(leaf in ADAPTER_KEYS or (cfg.train_bias == "all" and leaf.endswith("bias")))
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[2] in ADAPTER_KEYS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d (scale %g) on %d layers (%s): %d adapter parameters; %d of %d parameters train",
             cfg.r, scale, len(names), cfg.target, adapter_params, trainable, base_params + adapter_params)
    return {"target": cfg.target, "r": cfg.r, "scale": scale, "freeze_base": cfg.freeze_base,
            "train_bias": cfg.train_bias, "adapted_layers": len(names), "layers": names,
            "adapter_params": adapter_params, "base_params": base_params, "trainable_params": trainable}


def merge_lora(model: nn.Module) -> int:
    """Replace every adapted layer of `model` by its merged plain layer, in place; returns
    how many there were. The model's state dict is then a plain (unadapted) one."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALayer)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, getattr(owner, child).merged())
    return len(names)


def merged_copy(model: nn.Module) -> nn.Module:
    """`model` itself when it has no adapter, else a copy with them merged (merge_lora)."""
    if not any(isinstance(module, LoRALayer) for module in model.modules()):
        return model
    copy = deepcopy(model)
    merge_lora(copy)
    return copy
