"""A quantised base (train.quant): torchao weight-only quantisation of the Linear layers.

`int8wo` stores each quantisable `nn.Linear` weight as int8 with one float scale per
output row (torchao's `Int8WeightOnlyConfig`); `int4wo` as int4 in groups (torchao's
`Int4WeightOnlyConfig`, CUDA kernels only). The quantised weights are frozen: they are
no parameters, so the optimizer, the EMA, gradient clipping and stage freezing never see
them; the rest of the model (every Conv2d, norm and bias, and the Linear layers left out)
trains as usual against them.

Checkpoints stay plain tensors (run/checkpoint.py loads weights-only with an allowlist,
and torchao's tensor subclasses are no plain tensors): a quantised layer saves its float
*base* weight under the usual `weight` key and re-quantises it when loaded. Quantising
is deterministic and the base never changes, so a resume rebuilds the same int8 weights
bit for bit (re-quantising the dequantised int8 values instead would not: torchao's
rounding is not idempotent). The base stays in host memory; only the quantised weight
goes to the device.

Evaluation, prediction and export load the checkpoint into a float model and replace
each such base weight by the float value of its quantised weight
(`dequantise_for_inference`): the evaluated and exported model computes with exactly
the weights the run trained against, and ONNX sees a plain float graph.

Which layers: every `nn.Linear` outside `nn.MultiheadAttention` (whose out-projection
weight is read directly by torch's attention kernel). The dense detectors are all
convolutions and have none; ConvNeXt backbones (their MLPs) and the rtdetr head
(decoder, deformable attention, encoder feed-forward) do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detpact.errors import DetpactError

log = logging.getLogger(__name__)

MODES = ("none", "int8wo", "int4wo")
NEEDS_CUDA = {"int4wo"}  # torchao's int4 weight-only kernels (tinygemm) run on CUDA only
INT4_GROUP_SIZE = 128
INSTALL_HINT = "pip install 'detpact[adapt]'"


def quantisable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(parent name, parent, attribute, layer) of each Linear that quantisation takes, in
    module order (the same on the training model and on the float model of inference)."""
    from detpact.models.lora import LoRALayer  # lora.py imports this module

    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for attr, child in parent.named_children():
            # an adapted Linear (inference of a LoRA-over-quantised run) counts as the Linear it wraps
            if type(child) is nn.Linear or isinstance(child, QuantisedLinear) or \
                    (isinstance(child, LoRALayer) and not child.conv):
                yield parent_name, parent, attr, child


def quantised_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """`weight` (float, [out, in]) quantised by torchao on its device: a tensor subclass
    that F.linear dispatches to torchao's kernels."""
    ao = _torchao_quantization(mode)
    config = ao.Int8WeightOnlyConfig() if mode == "int8wo" else ao.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        holder.weight.copy_(weight)
    ao.quantize_(holder, config)
    return holder.weight.detach()


class QuantisedLinear(nn.Module):
    """A Linear layer computing with a frozen quantised weight and a trainable float bias.

    Its state dict is the plain Linear's (`weight` = the float base, `bias`), so a
    checkpoint loads into the float model as well as into this one.
    """

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        self.bias = linear.bias  # the same Parameter: it keeps training
        self.base = linear.weight.detach().to("cpu", copy=True)  # host memory: saved, re-quantised on load
        self.qweight = quantised_weight(linear.weight.detach(), mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.mode}"

    def dequantised(self) -> torch.Tensor:
        """The float values of the quantised weight ([out, in], the base's dtype)."""
        return self.qweight.dequantize().to(self.base.dtype)

    def save_base(self, destination: dict, prefix: str) -> None:
        """Put the float base in a state dict as `<prefix>weight` (on the model's device, as
        its other tensors: a copy, off the CPU)."""
        destination[prefix + "weight"] = self.base.to(self.qweight.device)

    def load_base(self, state_dict: dict, prefix: str, missing_keys: list, error_msgs: list) -> dict:
        """Take the float base from `<prefix>weight` and re-quantise it; returns the rest of
        `state_dict`, for the owner's own loading."""
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        elif tuple(state_dict[key].shape) != tuple(self.base.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, "
                              f"the shape in the current model is {tuple(self.base.shape)}.")
        else:
            self.base = state_dict[key].detach().to("cpu", self.base.dtype, copy=True)
            self.qweight = quantised_weight(self.base.to(self.qweight.device), self.mode)
        return {k: v for k, v in state_dict.items() if k != key}

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.save_base(destination, prefix)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        rest = self.load_base(state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def apply_quant(model: nn.Module, mode: str, required: bool, device: torch.device) -> dict[str, Any]:
    """Quantise `model`'s Linear layers in place (on `device`, where the model already is)
    per `train.quant`; returns the record kept under `weights.quant` in the checkpoints
    and train_report.json: requested, applied (the mode, or "none"), reason (why not),
    layers and quantised_params.

    What this device cannot run raises a DetpactError naming the device requirement when
    `required` (train.quant_required), and is otherwise skipped with a warning, recorded.
    """
    record: dict[str, Any] = {"requested": mode, "required": required, "applied": "none", "reason": None,
                              "layers": 0, "quantised_params": 0}
    if mode == "none":
        return record
    if mode in NEEDS_CUDA and device.type != "cuda":
        return _not_applied(record, f"train.quant: {mode} needs a CUDA device (torchao's int4 weight-only kernels "
                                    f"run on CUDA only) and this run trains on {device.type}",
                            "Train on a CUDA device or set train.quant: int8wo or none")
    layers = list(quantisable_linears(model))
    if not layers:
        return _not_applied(record, f"train.quant: {mode}: the model has no Linear layer to quantise (its "
                                    "convolutions stay float; the rtdetr head and ConvNeXt backbones have Linear layers)",
                            "Set train.quant: none, or pick a model with Linear layers")
    try:
        for _, parent, attr, linear in layers:
            setattr(parent, attr, QuantisedLinear(linear, mode))
    except DetpactError:
        raise
    except Exception as exc:  # a torchao kernel missing on this machine (e.g. int4's mslk): reported as such
        for _, parent, attr, linear in layers:
            setattr(parent, attr, linear)
        return _not_applied(record, f"train.quant: {mode} is not supported by torchao on this machine "
                                    f"({device.type}): {type(exc).__name__}: {str(exc).splitlines()[0]}",
                            "Set train.quant: int8wo or none, or install the kernels torchao names")
    if not any(p.requires_grad for p in model.parameters()):
        raise DetpactError(f"train.quant: {mode} quantises every trained weight of this model, which leaves no "
                           "parameter to train. Set train.quant: none.")
    record.update(applied=mode, layers=len(layers), quantised_params=sum(lin.weight.numel() for *_, lin in layers))
    log.info("train.quant %s: %d Linear layers (%.2fM weights) quantised and frozen; convolutions, norms and biases "
             "train in float", mode, record["layers"], record["quantised_params"] / 1e6)
    return record


def dequantise_for_inference(model: nn.Module, record: dict[str, Any] | None) -> int:
    """Give a float model loaded from a quantised run's checkpoint the weights that run
    trained against: each quantised layer's base weight becomes the float value of its
    quantised weight. `record`: the checkpoint's `weights.quant`. Returns the layers set."""
    mode = (record or {}).get("applied", "none")
    if mode == "none":
        return 0
    # int4 is quantised where its kernels are (the same rounding as in training), then brought back
    where = torch.device("cuda") if mode in NEEDS_CUDA else linear_device(model)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise DetpactError(f"This checkpoint comes from a train.quant: {mode} run, whose weights can only be "
                           "rebuilt on a CUDA device (torchao's int4 kernels); evaluate, predict or export it there.")
    layers = list(quantisable_linears(model))
    with torch.no_grad():
        for _, _, _, linear in layers:
            dequantised = quantised_weight(linear.weight.detach().to(where), mode).dequantize()
            linear.weight.copy_(dequantised.to(linear.weight.device, linear.weight.dtype))
    return len(layers)


def linear_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _not_applied(record: dict[str, Any], reason: str, fix: str) -> dict[str, Any]:
    """Refuse (train.quant_required) or skip with a warning that the record keeps."""
    if record["required"]:
        raise DetpactError(f"{reason}, and train.quant_required is set. {fix}, or train.quant_required: false to "
                           "train unquantised with a recorded warning.")
    log.warning("%s: training without quantisation (recorded in train_report.json under weights.quant)", reason)
    record["reason"] = reason
    return record


def _torchao_quantization(mode: str) -> Any:
    """torchao.quantization, imported on first use (an optional extra; its import is slow
    and logs warnings about CUDA kernels it cannot load on CPU machines, muted here)."""
    muted = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in muted]
    for logger in muted:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as ao
    except ImportError as exc:
        raise DetpactError(f"train.quant: {mode} needs torchao, which is not installed ({exc}). Install it with "
                           f"{INSTALL_HINT}, or set train.quant: none.") from None
    finally:
        for logger, level in zip(muted, levels):
            logger.setLevel(level)
    return ao
