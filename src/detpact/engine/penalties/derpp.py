"""Dark Experience Replay++ (Buzzega et al., 2020), for detection.

A reservoir buffer keeps up to `buffer_size` training samples seen so far (this task's and,
through continual.pt, the previous tasks'): each one's image (uint8, as the model saw
it), boxes and labels, and the class logits the model gave it when it was added. On every
micro-batch `replay_batch` of them are drawn and passed through the model once, for
DER++'s two terms:
    loss_derpp_logits = alpha x mean (logits_now - logits_stored)^2
    loss_derpp_labels = beta  x the detection loss on their boxes
then the micro-batch's own samples are offered to the reservoir (each sample seen is kept
with probability buffer_size / seen). The buffer and its random stream are in the
checkpoint bundle, so a resume replays the same samples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.config.continual import DerppConfig
from detpact.engine.runtime import autocast
from detpact.errors import DetpactError


class DerppReplay:
    """The reservoir buffer and DER++'s terms; `criterion` gives the label term."""

    def __init__(self, cfg: DerppConfig, criterion: Any, device: torch.device, amp: str, seed: int,
                 previous: dict[str, Any] | None = None):
        self.cfg, self.criterion, self.device, self.amp = cfg, criterion, device, amp
        self.generator = torch.Generator().manual_seed(seed)
        self.images: Tensor | None = None  # [S, 3, H, W] uint8, the first `count` rows filled
        self.logits: Tensor | None = None  # [S, N, C] float32
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.count = 0
        self.seen = 0
        if previous is not None:
            self._load_buffer(previous)

    def losses(self, model: nn.Module, images: Tensor, targets: list[dict], outputs: Any) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if (self.cfg.alpha > 0 or self.cfg.beta > 0) and self.count > 0:
            if self.images.shape[1:] != images.shape[1:]:
                raise DetpactError(f"train.continual.derpp: the buffer holds {tuple(self.images.shape[2:])} px images "
                                   f"and this run trains on {tuple(images.shape[2:])} px: keep data.image_size "
                                   "between tasks.")
            pick = torch.randperm(self.count, generator=self.generator)[:self.cfg.replay_batch]
            pixels = self.images[pick].to(self.device).float().div_(255.0)
            if images.is_contiguous(memory_format=torch.channels_last):
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            replayed = [{"boxes": self.boxes[i].to(self.device), "labels": self.labels[i].to(self.device)}
                        for i in pick.tolist()]
            with autocast(self.device, self.amp):
                out = model(pixels, replayed)
            if self.cfg.alpha > 0:
                stored = self.logits[pick].to(self.device)
                terms["loss_derpp_logits"] = self.cfg.alpha * F.mse_loss(out.cls_logits.float(), stored)
            if self.cfg.beta > 0:
                terms["loss_derpp_labels"] = self.cfg.beta * self.criterion(out, replayed)["loss"]
        self._offer(images, targets, outputs.cls_logits)
        return terms

    @torch.no_grad()
    def _offer(self, images: Tensor, targets: list[dict], logits: Tensor) -> None:
        """Reservoir sampling of the micro-batch's samples."""
        size = self.cfg.buffer_size
        if self.images is None:
            self.images = torch.zeros((size, *images.shape[1:]), dtype=torch.uint8)
            self.logits = torch.zeros((size, *logits.shape[1:]), dtype=torch.float32)
        for i in range(len(images)):
            self.seen += 1
            if self.count < size:
                slot = self.count
                self.count += 1
                self.boxes.append(torch.empty(0))
                self.labels.append(torch.empty(0))
            else:
                slot = int(torch.randint(self.seen, (1,), generator=self.generator))
                if slot >= size:
                    continue
            self.images[slot] = (images[i].float() * 255.0).round().to(torch.uint8).cpu()
            self.logits[slot] = logits[i].detach().float().cpu()
            self.boxes[slot] = targets[i]["boxes"].detach().cpu().clone()
            self.labels[slot] = targets[i]["labels"].detach().cpu().clone()

    def after_step(self, model: nn.Module) -> None:
        pass

    def buffer_state(self) -> dict[str, Any] | None:
        """The buffer as plain tensors (what continual.pt hands to the next task)."""
        if self.count == 0:
            return None
        return {"images": self.images[:self.count].clone(), "logits": self.logits[:self.count].clone(),
                "boxes": torch.cat(self.boxes), "labels": torch.cat(self.labels),
                "sizes": torch.tensor([len(b) for b in self.boxes], dtype=torch.int64), "seen": self.seen}

    def _load_buffer(self, state: dict[str, Any]) -> None:
        size = self.cfg.buffer_size
        keep = min(size, len(state["images"]))
        self.images = torch.zeros((size, *state["images"].shape[1:]), dtype=torch.uint8)
        self.logits = torch.zeros((size, *state["logits"].shape[1:]), dtype=torch.float32)
        self.images[:keep], self.logits[:keep] = state["images"][:keep], state["logits"][:keep]
        sizes = state["sizes"].tolist()
        self.boxes = list(torch.split(state["boxes"], sizes))[:keep]
        self.labels = list(torch.split(state["labels"], sizes))[:keep]
        self.count, self.seen = keep, int(state["seen"])

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer_state(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self.logits, self.boxes, self.labels, self.count, self.seen = None, None, [], [], 0, 0
        if state["buffer"] is not None:
            self._load_buffer(state["buffer"])
        self.generator.set_state(state["generator"])
