"""Every foreign weight file: reading it safely, mapping its keys, and the load report.

A run's starting weights come from `model.init_from` (a whole detector) and
`model.backbone.weights` (the backbone alone). Files are read with
`torch.load(..., weights_only=True)` or safetensors, never unpickled in full: a file
that needs that is refused with the way to convert it. Tensors load where key AND shape
match; the rest keep their initial values and are listed in a `LoadReport`, which goes
into the checkpoint's "weights" entry and train_report.json. `apply_freeze` then fixes
the parts named in `model.freeze` and, with `model.freeze_bn`, every BatchNorm's statistics.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detpact.config import ModelConfig
from detpact.errors import DetpactError
from detpact.run.checkpoint import check_torch_version, first_line, inference_state_dict, unsafe_globals
from detpact.run.contract import sha256_file

log = logging.getLogger(__name__)

# Entries of a checkpoint dict that may hold the weights, in the order they are tried: the
# EMA weights first (what the model was evaluated with; RT-DETR and YOLO checkpoints keep
# them beside the raw ones), then the plain weights, then a self-distillation teacher.
# `module` unwraps {"module": state_dict} (an EMA's state, DDP-style wrappers).
PAYLOAD_KEYS = ("ema", "ema_model", "model", "state_dict", "model_state_dict", "teacher", "module")
# Key prefixes of wrappers: DDP / DataParallel, Lightning, torch.compile, a detector's
# backbone (for backbone-only loading), torchvision detection models' backbone.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "backbone.body.")
HOW_TO_CONVERT = (
    "Convert it once, in a Python session you trust: `sd = torch.load(FILE, weights_only=False)` "
    "(take its model: `sd = sd['model']` or similar, then `sd = sd.state_dict()` if that is an "
    "nn.Module), then `torch.save(sd, 'weights.pt')` or "
    "`safetensors.torch.save_file(sd, 'weights.safetensors')`, and point the config at the new file."
)


@dataclass
class LoadReport:
    """What `load_matching` did with a file's tensors, by state-dict key."""

    what: str  # what was loaded into: "detector", "backbone"
    file: str
    matched: list[str] = field(default_factory=list)  # loaded
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: initial values kept
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    # (key, shape in the file, shape in the model): initial values kept
    shape_mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON and the checkpoint bundle (matched keys as a count only)."""
        return {
            "file": self.file, "sha256": self.sha256, "into": self.what,
            "counts": {"matched": len(self.matched), "missing": len(self.missing),
                       "unexpected": len(self.unexpected), "shape_mismatched": len(self.shape_mismatched)},
            "missing": list(self.missing), "unexpected": list(self.unexpected),
            "shape_mismatched": [{"key": k, "file_shape": list(f), "model_shape": list(m)}
                                 for k, f, m in self.shape_mismatched],
        }

    def summary(self) -> str:
        total = len(self.matched) + len(self.missing) + len(self.shape_mismatched)
        return (f"{self.what} <- {self.file}: {len(self.matched)} of {total} tensors loaded, "
                f"{len(self.shape_mismatched)} with another shape, {len(self.missing)} not in the file, "
                f"{len(self.unexpected)} of the file unused")

    def details(self) -> list[str]:
        """One line per part whose tensors were not loaded, for the log."""
        lines = []
        for part, items in _by_part(self.shape_mismatched, lambda item: item[0]).items():
            key, in_file, in_model = items[0]
            more = ", ..." if len(items) > 1 else ""
            lines.append(f"{part}: {len(items)} tensors with another shape ({key} {in_file} in the file vs "
                         f"{in_model}{more}) keep their initial values")
        for part, keys in _by_part(self.missing, lambda key: key).items():
            lines.append(f"{part}: {len(keys)} tensors not in the file ({_sample(keys)}) keep their initial values")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} tensors of the file have no place in the {self.what} and are "
                         f"ignored ({_sample(self.unexpected)})")
        return lines


def read_weight_file(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a weight file: `.safetensors`, or anything torch.save wrote,
    loaded with weights_only=True. Unwraps a detpact checkpoint (its EMA weights when it
    kept them), a {PAYLOAD_KEYS...} dict (nested too) or a raw state dict; entries that
    are not tensors are dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DetpactError(f"Weight file not found: {path} (relative paths start at the current directory).")
    payload = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    found = _unwrap(payload)
    if found is None:
        raise DetpactError(f"{path} holds no tensors: it is not a weights file. Pass a state dict, a checkpoint "
                           "or a .safetensors file.")
    state, trail = found
    log.info("read %d tensors from %s%s", len(state), path, f" (its '{trail}' entry)" if trail else "")
    return state


def strip_prefixes(state: Mapping[str, Tensor], target_keys: Iterable[str],
                   prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Tensor]:
    """`state` with wrapper prefixes (`module.`, `backbone.`, ...) removed from its keys:
    the sequence of up to three prefix removals (`module.backbone.` is two) that makes the
    most keys match `target_keys`, applied only when it makes more of them match."""
    target = set(target_keys)
    best, best_hits, best_trail = dict(state), sum(key in target for key in state), ""
    # A search, not greedy stripping: `module.` alone may match nothing in a
    # `module.backbone.` file, yet be the first half of the removal that matches it all.
    frontier = [(best, "")]
    for _ in range(3):
        stripped_level = []
        for current, trail in frontier:
            for prefix in prefixes:
                stripped = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in current.items()}
                if stripped.keys() == current.keys() or len(stripped) < len(current):  # no-op, or keys merged
                    continue
                stripped_level.append((stripped, trail + prefix))
                hits = sum(key in target for key in stripped)
                if hits > best_hits:
                    best, best_hits, best_trail = stripped, hits, trail + prefix
        frontier = stripped_level
    if best_trail:
        log.debug("stripped the key prefix %r: %d keys match", best_trail, best_hits)
    return best


def load_matching(module: nn.Module, state: Mapping[str, Tensor], what: str,
                  source: str = "the weight file") -> LoadReport:
    """Load the tensors of `state` whose key and shape match `module`'s state dict (values
    copied exactly); everything else keeps its initial value and is listed in the report.
    A file of which nothing matches is an error."""
    current = module.state_dict()
    report = LoadReport(what=what, file=source)
    loadable = {}
    for key, value in state.items():
        if key not in current:
            report.unexpected.append(key)
        elif value.shape != current[key].shape:
            report.shape_mismatched.append((key, list(value.shape), list(current[key].shape)))
        else:
            loadable[key] = value
            report.matched.append(key)
    report.missing = [key for key in current if key not in state]
    if not loadable:
        by_shape = f" ({len(report.shape_mismatched)} match by name but have another shape)" \
            if report.shape_mismatched else ""
        raise DetpactError(f"No tensor of {source} matches the {what}{by_shape}: the file's keys look like "
                           f"{_sample(list(state))}, the {what}'s like {_sample(list(current))}. Check that the "
                           "file holds weights of this architecture (model.backbone.name and its args).")
    module.load_state_dict(loadable, strict=False)
    return report


def apply_initial_weights(model: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """Load `cfg.init_from` into the whole detector, then `cfg.backbone.weights` into its
    backbone (so the latter wins where both give a tensor). Returns
    {"init_from": report dict | None, "backbone_weights": report dict | None}."""
    reports: dict[str, Any] = {"init_from": None, "backbone_weights": None}
    if cfg.init_from:
        reports["init_from"] = _load_file(model, cfg.init_from, "model.init_from", "detector").as_dict()
    if cfg.backbone.weights:
        reports["backbone_weights"] = _load_file(model.backbone, cfg.backbone.weights, "model.backbone.weights",
                                                 "backbone").as_dict()
    return reports


def carried_initial_weights(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """The starting-weights reports of the run a checkpoint belongs to (for a resume, whose
    weights come from the checkpoint itself)."""
    weights = bundle.get("weights") or {}
    return {"init_from": weights.get("init_from"), "backbone_weights": weights.get("backbone_weights")}


def apply_freeze(model: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """Stop training the parts in `cfg.freeze` (requires_grad False) and, with
    `cfg.freeze_bn`, the statistics of every BatchNorm layer. Call before the optimizer
    and the EMA are built. Returns the counts for the run's records."""
    for part in cfg.freeze:
        for param in getattr(model, part).parameters():
            param.requires_grad_(False)
    bn_layers = freeze_batchnorm(model) if cfg.freeze_bn else 0
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise DetpactError(f"model.freeze ({', '.join(cfg.freeze)}) leaves no parameter to train. Freeze fewer parts.")
    if cfg.freeze or cfg.freeze_bn:
        log.info("frozen: %s%s; %d frozen / %d trainable parameters", ", ".join(cfg.freeze) or "no part",
                 f", the statistics of {bn_layers} BatchNorm layers" if cfg.freeze_bn else "", frozen, trainable)
    return {"frozen_parts": list(cfg.freeze), "frozen_params": frozen, "trainable_params": trainable,
            "freeze_bn": cfg.freeze_bn, "frozen_bn_layers": bn_layers}


class FrozenStatistics:
    """Mixed into the class of a BatchNorm layer by `freeze_batchnorm`: the layer stays in
    eval mode whatever `train()` asks, so it always normalises with its running statistics
    and never updates them (its affine weight and bias still train). It also reports
    `track_running_stats = False`, so BatchNorm recalibration leaves it alone."""

    def train(self, mode: bool = True) -> nn.Module:
        return super().train(False)  # type: ignore[misc]


_FROZEN_CLASSES: dict[type, type] = {}


def freeze_batchnorm(model: nn.Module) -> int:
    """Give every BatchNorm layer of `model` (any `_BatchNorm` subclass) frozen statistics;
    buffers, parameters and state-dict keys stay as they are. Returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        cls = type(layer)
        if not issubclass(cls, FrozenStatistics):
            if cls not in _FROZEN_CLASSES:
                _FROZEN_CLASSES[cls] = type(f"FrozenStatistics{cls.__name__}", (FrozenStatistics, cls),
                                            {"__module__": __name__})
            layer.__class__ = _FROZEN_CLASSES[cls]
        # In eval mode BatchNorm reads its buffers whatever this flag says; off, it tells
        # recalibrate_batchnorm (and anyone else) that the statistics are not to be gathered.
        layer.track_running_stats = False
        layer.train(False)
    return len(layers)


def _load_file(module: nn.Module, path: str, key: str, what: str) -> LoadReport:
    try:
        state = strip_prefixes(read_weight_file(path), module.state_dict().keys())
        report = load_matching(module, state, what, source=path)
    except DetpactError as exc:
        raise DetpactError(f"{key}: {exc.message}") from None
    report.sha256 = sha256_file(Path(path).expanduser())
    log.info("%s: %s", key, report.summary())
    for line in report.details():
        log.info("  %s", line)
    return report


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DetpactError(f"{path} is not a readable .safetensors file ({first_line(exc)}).") from None


def _read_torch(path: Path) -> Any:
    check_torch_version(torch.__version__)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text and "Unsupported global" not in text:
            raise DetpactError(f"{path} is not a weights file or is damaged ({first_line(exc)}).") from None
        unsafe = unsafe_globals(path) or [line.split("GLOBAL ")[1].split(" ")[0]
                                           for line in text.splitlines() if "GLOBAL " in line]
        objects = f" ({', '.join(unsafe[:5])})" if unsafe else ""
        raise DetpactError(
            f"{path} was refused: it holds Python objects{objects}, not only tensors and plain values, and "
            f"reading it would run code from the file. {HOW_TO_CONVERT.replace('FILE', repr(str(path)))}"
        ) from None
    except Exception as exc:  # torch.load reports a non-torch file as KeyError, EOFError, RuntimeError, ...
        raise DetpactError(f"{path} is not a weights file or is damaged ({first_line(exc)}). Pass a "
                           "state dict saved with torch.save, a checkpoint or a .safetensors file.") from None


def _unwrap(payload: Any, depth: int = 0) -> tuple[dict[str, Tensor], str] | None:
    """The state dict in `payload` and the path of entries leading to it ("" when it is
    `payload` itself); None when there is none."""
    if not isinstance(payload, Mapping) or depth > 4:
        return None
    if "format_version" in payload and "model" in payload:  # a detpact checkpoint bundle
        state = inference_state_dict(payload)  # the EMA's, unless the run evaluated its raw weights
        return _tensors(state), "model" if state is payload["model"] else "ema.module"
    for key in PAYLOAD_KEYS:
        found = _unwrap(payload.get(key), depth + 1)
        if found is not None:
            state, trail = found
            return state, f"{key}.{trail}" if trail else key
    tensors = _tensors(payload)
    return (tensors, "") if tensors else None


def _tensors(payload: Mapping) -> dict[str, Tensor]:
    return {str(key): value for key, value in payload.items() if isinstance(value, Tensor)}


def _by_part(items: list, key_of: Any) -> dict[str, list]:
    """`items` grouped by the first component of their state-dict key ("head", "backbone", ...)."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(key_of(item).split(".")[0], []).append(item)
    return groups


def _sample(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "none"
