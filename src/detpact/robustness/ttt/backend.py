"""`TTTBackend`: a backend that adapts a private copy of the detector to each test batch
before predicting it (Tent or MIM), with guard rails, and counts what it did.

For one batch x (float images [b, 3, S, S], b <= settings.batch_size):

    reset "sample": theta <- theta_0 (and a fresh optimizer)
    if adapting (under --ttt-max-batches, not stopped):
        for each of settings.steps:
            loss = objective(x)                     # Tent: entropy of confident predictions; MIM: reconstruction
            rollback guard: loss above the previous step's -> undo that step, stop
            step the optimizer on the norm affine parameters
            drift guard: ||theta - theta_0|| / ||theta_0|| above the cap -> theta <- theta_0, stop
    outputs = model(x)                              # the prediction (BatchNorm: settings.norm_stats)
    rollback guard: the last step raised the loss -> undo it, predict again
    entropy guard: confident predictions' mean entropy below the floor -> undo the batch, stop adapting

The loaded model and the run's checkpoints are never touched: the backend adapts a deep copy.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from detpact.config import PostprocessConfig
from detpact.engine.evaluate import TorchBackend, prepare_images
from detpact.engine.runtime import autocast
from detpact.errors import DetpactError
from detpact.models.postprocess import Detections, postprocess
from detpact.robustness.ttt.adapt import (
    confident_entropy,
    configure_norms,
    mim_loss,
    relative_drift,
    restore,
    snapshot,
)
from detpact.robustness.ttt.settings import SHIFT_SCALE, TTTSettings

log = logging.getLogger(__name__)


@dataclass
class TTTReport:
    """What a TTT backend did: batches seen and adapted, optimizer steps taken, the time
    spent adapting (the optimizer steps and the guards' checks and re-predictions, not the
    prediction every batch has), and how often each guard fired."""

    settings: dict[str, Any]
    batches: int = 0
    adapted_batches: int = 0
    steps: int = 0
    adapt_seconds: float = 0.0
    guards: dict[str, int] = field(default_factory=lambda: {"drift_reset": 0, "rollback": 0, "entropy_stop": 0})
    stopped: bool = False  # the entropy guard stopped adaptation (stream reset)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "batches": self.batches, "adapted_batches": self.adapted_batches,
                "steps": self.steps, "adapt_seconds": round(self.adapt_seconds, 3), "guards": dict(self.guards),
                "stopped": self.stopped}

    def summary(self) -> str:
        fired = ", ".join(f"{name} {count}" for name, count in self.guards.items())
        return (f"test-time training ({self.settings['preset']}, {self.settings['method']}, reset "
                f"{self.settings['reset']}): adapted {self.adapted_batches} of {self.batches} batches in "
                f"{self.steps} steps, {self.adapt_seconds:.1f} s; guards fired: {fired}")


class TTTBackend:
    """A backend (engine.evaluate.Backend) over a private copy of `model` that it adapts."""

    def __init__(self, model: nn.Module, settings: TTTSettings, post_cfg: PostprocessConfig, device: torch.device,
                 amp: str, channels_last: bool):
        if settings.method == "mim" and getattr(model, "mim_decoder", None) is None:
            raise DetpactError(
                f"--ttt-preset {settings.preset} adapts with masked-image reconstruction, but this checkpoint has "
                "no MIM decoder. Train the run with `model: {mim_decoder: true}` in its config (or "
                "`--set model.mim_decoder=true`), or use --ttt-preset safe (Tent).")
        self.model = copy.deepcopy(model)  # the caller's model (and the run's files) stay as they are
        scope = self.model.backbone if settings.method == "mim" else self.model
        self.params = configure_norms(self.model, scope, SHIFT_SCALE if settings.norm_stats == "blend" else None)
        if not self.params:
            raise DetpactError("--ttt found no normalisation layer with an affine weight to adapt in this model "
                               "(e.g. model.backbone.norm: frozen_bn freezes the backbone's).")
        self.original = snapshot(self.params)
        self.settings, self.post_cfg, self.device = settings, post_cfg, device
        self.amp, self.channels_last = amp, channels_last
        self.report = TTTReport(settings.as_dict())
        self.optimizer: torch.optim.Optimizer | None = None

    def set_postprocess(self, post_cfg: PostprocessConfig) -> None:
        self.post_cfg = post_cfg

    def __call__(self, images: Tensor) -> list[Detections]:
        return self.detect(prepare_images(images, self.device, self.channels_last))

    def detect(self, images: Tensor) -> list[Detections]:
        """Detections of float images [B, 3, H, W] in [0, 1], adapting on each chunk of
        settings.batch_size images first."""
        images = images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        results: list[Detections] = []
        for chunk in images.split(self.settings.batch_size):
            results += self._batch(chunk)
        return results

    def _batch(self, x: Tensor) -> list[Detections]:
        number = self.report.batches
        self.report.batches += 1
        if self.settings.reset == "sample":
            restore(self.params, self.original)
            self.optimizer = None
        limit = self.settings.max_batches
        adapting = not self.report.stopped and (limit is None or self.report.adapted_batches < limit)
        if not adapting:
            return self._predict(x)[0]
        started = time.perf_counter()
        self.report.adapted_batches += 1
        before_batch = snapshot(self.params)
        last = self._adapt(x, number)
        self.report.adapt_seconds += time.perf_counter() - started
        detections, entropy = self._predict(x)  # the prediction every batch costs: not counted as adapting
        started = time.perf_counter()
        guards = self.settings.guards
        if last is not None and guards.rollback:  # did the last step raise the loss? (Tent's is the entropy)
            loss = entropy if self.settings.method == "tent" else self._mim_value(x, number)
            if loss is not None and loss > last[0]:
                restore(self.params, last[1])
                self.report.guards["rollback"] += 1
                detections, entropy = self._predict(x)
        if guards.entropy_floor is not None and entropy is not None and entropy < guards.entropy_floor:
            restore(self.params, before_batch)
            self.report.guards["entropy_stop"] += 1
            self.report.stopped = self.settings.reset == "stream"
            detections, _ = self._predict(x)
        self.report.adapt_seconds += time.perf_counter() - started
        return detections

    def _adapt(self, x: Tensor, number: int) -> tuple[float, dict[str, Tensor]] | None:
        """settings.steps optimizer steps on batch `x`; returns the loss before the last step
        taken and the weights it started from (None when no step was taken)."""
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(list(self.params.values()), lr=self.settings.lr)
        guards = self.settings.guards
        previous = None
        for _ in range(self.settings.steps):
            loss = self._objective(x, number)
            if loss is None:  # Tent: nothing confident to sharpen
                return previous
            value = float(loss.detach())
            if previous is not None and guards.rollback and value > previous[0]:
                restore(self.params, previous[1])
                self.report.guards["rollback"] += 1
                return None
            weights = snapshot(self.params)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.report.steps += 1
            if guards.max_drift is not None and relative_drift(self.params, self.original) > guards.max_drift:
                restore(self.params, self.original)
                self.optimizer = torch.optim.Adam(list(self.params.values()), lr=self.settings.lr)
                self.report.guards["drift_reset"] += 1
                return None
            previous = (value, weights)
        return previous

    def _objective(self, x: Tensor, number: int) -> Tensor | None:
        with autocast(self.device, self.amp):
            if self.settings.method == "mim":
                return mim_loss(self.model, x, self._mask_seed(number))
            outputs = self.model(x)
        loss, count = confident_entropy(outputs.cls_logits, self.settings.confidence)
        return loss if count else None

    @torch.no_grad()
    def _mim_value(self, x: Tensor, number: int) -> float:
        with autocast(self.device, self.amp):
            return float(mim_loss(self.model, x, self._mask_seed(number)))

    def _mask_seed(self, number: int) -> int:
        return self.settings.seed * 1_000_003 + number  # the same masks for a batch on every run

    @torch.no_grad()
    def _predict(self, x: Tensor) -> tuple[list[Detections], float | None]:
        """The batch's detections and the mean entropy of its confident predictions (None when
        there are none)."""
        with autocast(self.device, self.amp):
            out = self.model(x)
        entropy, count = confident_entropy(out.cls_logits, self.settings.confidence)
        detections = postprocess(out.cls_logits, out.boxes, self.post_cfg, nms=not self.model.nms_free)
        return detections, float(entropy) if count else None


def combine_reports(reports: list[TTTReport]) -> dict[str, Any]:
    """What several TTT backends did (one per split of `detpact test`): the settings, the
    totals and each backend's own counts, in order."""
    totals = TTTReport(reports[0].settings if reports else {})
    for report in reports:
        totals.batches += report.batches
        totals.adapted_batches += report.adapted_batches
        totals.steps += report.steps
        totals.adapt_seconds += report.adapt_seconds
        for name, count in report.guards.items():
            totals.guards[name] += count
    combined = totals.as_dict()
    combined.pop("stopped")
    combined["per_split"] = [{k: v for k, v in r.as_dict().items() if k != "settings"} for r in reports]
    return combined


def ttt_backend(backend: Any, model: nn.Module, settings: TTTSettings) -> TTTBackend:
    """A TTT backend over `model` that predicts as the PyTorch `backend` does (its
    postprocessing, device, precision and memory format)."""
    if not isinstance(backend, TorchBackend):
        raise DetpactError("--ttt adapts the PyTorch model: it runs with the torch backend (a run's checkpoint), "
                           "not with an exported ONNX model.")
    return TTTBackend(model, settings, backend.post_cfg, backend.device, backend.amp, backend.channels_last)


def wrap_backend(backend: Any, loaded: Any, settings: TTTSettings | None) -> Any:
    """`backend` itself without settings, else a TTT backend adapting a copy of `loaded.model`
    (an inference.predictor.LoadedModel) and predicting as `backend` does."""
    if settings is None:
        return backend
    return ttt_backend(backend, loaded.model if loaded is not None else None, settings)
