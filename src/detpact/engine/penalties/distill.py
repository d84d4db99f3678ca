"""Self-distillation from a teacher checkpoint: the model is pulled towards what the
teacher (usually the previous task's best.pt) predicts on the same batch.

loss_distill = weight x (T^2 x mean KL of the per-class Bernoullis sigmoid(z / T)
                         + mean |boxes_s - boxes_t| / image size)
The head's classes are independent sigmoids, not a softmax, so the KL is the binary one
of each class at each location (or query). For the rtdetr head the queries are compared
in order, which holds while the student stays near the teacher it started from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.config.continual import SelfDistillConfig
from detpact.engine.runtime import autocast
from detpact.errors import DetpactError
from detpact.run.contract import sha256_file


def bernoulli_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(Bernoulli(sigmoid(p)) || Bernoulli(sigmoid(q))), elementwise."""
    p = torch.sigmoid(p_logits)
    return (p * (F.logsigmoid(p_logits) - F.logsigmoid(q_logits))
            + (1 - p) * (F.logsigmoid(-p_logits) - F.logsigmoid(-q_logits)))


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float, kl: str) -> Tensor:
    """T^2 x the mean KL between the tempered per-class sigmoids; `kl` forward (teacher ||
    student), reverse, or sym (their mean)."""
    s, t = student / temperature, teacher / temperature
    if kl == "forward":
        value = bernoulli_kl(t, s).mean()
    elif kl == "reverse":
        value = bernoulli_kl(s, t).mean()
    else:
        value = 0.5 * (bernoulli_kl(t, s).mean() + bernoulli_kl(s, t).mean())
    return value * temperature ** 2


def box_distillation(student: Tensor, teacher: Tensor, height: int, width: int) -> Tensor:
    """Mean L1 between xyxy pixel boxes [B, N, 4], in fractions of the image size."""
    scale = student.new_tensor([width, height, width, height])
    return ((student - teacher).abs() / scale).mean()


class SelfDistill:
    """The distillation penalty; its state is the teacher file's sha256 (the teacher itself is
    a fixed file, reloaded on resume, which must find the same one)."""

    def __init__(self, cfg: SelfDistillConfig, teacher: nn.Module, device: torch.device, amp: str,
                 teacher_sha256: str = ""):
        self.cfg, self.teacher, self.device, self.amp = cfg, teacher.eval().requires_grad_(False), device, amp
        self.teacher_sha256 = teacher_sha256

    @classmethod
    def from_checkpoint(cls, cfg: SelfDistillConfig, device: torch.device, amp: str) -> SelfDistill:
        from detpact.inference.predictor import load_detector  # the teacher: weights-only, its inference weights

        path = Path(cfg.teacher)
        if not path.is_file():
            raise DetpactError(f"train.continual.self_distill.teacher: checkpoint not found: {path}. Name a "
                               "detpact checkpoint, e.g. the previous task's runs/<id>/checkpoints/best.pt.")
        return cls(cfg, load_detector(path, device).model, device, amp, sha256_file(path))

    def losses(self, model: nn.Module, images: Tensor, targets: list[dict], outputs: Any) -> dict[str, Tensor]:
        with torch.no_grad(), autocast(self.device, self.amp):
            teacher = self.teacher(images)
        if teacher.cls_logits.shape != outputs.cls_logits.shape:
            raise DetpactError(f"train.continual.self_distill.teacher ({self.cfg.teacher}) predicts "
                               f"{tuple(teacher.cls_logits.shape)} class logits where the model predicts "
                               f"{tuple(outputs.cls_logits.shape)}: the teacher needs the same head and classes.")
        value = outputs.cls_logits.new_zeros((), dtype=torch.float32)
        if "logits" in self.cfg.keys:
            value = value + logit_distillation(outputs.cls_logits.float(), teacher.cls_logits.float(),
                                               self.cfg.temperature, self.cfg.kl)
        if "bbox" in self.cfg.keys:
            value = value + box_distillation(outputs.boxes.float(), teacher.boxes.float(), *images.shape[-2:])
        return {"loss_distill": self.cfg.weight * value}

    def after_step(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_sha256": self.teacher_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("teacher_sha256") != self.teacher_sha256:
            raise DetpactError(f"Cannot resume: the teacher {self.cfg.teacher} changed since the run started "
                               "(its sha256 differs). Restore the teacher the run started with.")
