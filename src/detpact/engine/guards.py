"""Non-finite guard: skip steps whose loss or gradients are not finite (or that ran out
of memory), count why, and abort after N in a row."""

from __future__ import annotations

import math

import torch
from torch import nn

from detpact.errors import TrainingAborted

# Why a step was skipped: its loss or gradients held NaN, or Inf, or it ran out of memory.
SKIP_KINDS = ("nan", "inf", "oom")


class NonFiniteGuard:
    """Counts skipped steps and why (`note`, `record`); `check` raises TrainingAborted after
    `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, last_good_checkpoint: str):
        self.max_consecutive = max_consecutive
        self.last_good_checkpoint = last_good_checkpoint
        self.skipped = 0
        self.consecutive = 0
        self.counts = dict.fromkeys(SKIP_KINDS, 0)  # steps that met each kind of failure
        self.reasons: list[str] = []  # of the step in progress

    def note(self, kind: str) -> None:
        """The step in progress met a failure of `kind` (one of SKIP_KINDS)."""
        if kind not in self.reasons:
            self.reasons.append(kind)

    def record(self, ok: bool) -> str | None:
        """Close the step; returns why it was skipped ("nan", "inf+oom", ...) or None."""
        reasons, self.reasons = self.reasons, []
        if ok:
            self.consecutive = 0
            return None
        self.skipped += 1
        self.consecutive += 1
        for kind in reasons:
            self.counts[kind] += 1
        return "+".join(reasons) or "nan"

    def check(self, step: int) -> None:
        if self.consecutive >= self.max_consecutive:
            raise TrainingAborted(
                f"Training aborted at step {step}: the loss or gradients were not finite for {self.consecutive} "
                f"step(s) in a row ({', '.join(k for k in SKIP_KINDS if self.counts[k])} among the skipped), the limit of train.nonfinite (policy abort stops at the first, "
                "policy skip after max_consecutive). "
                f"The last good checkpoint is {self.last_good_checkpoint}. Lower train.optimizer.lr, "
                "check the labels for degenerate boxes, or try run.amp: none (out of memory: lower "
                "train.batch_size), then resume or restart.", reason="nonfinite_abort"
            )

    def check_weights(self, step: int, *models: nn.Module | None) -> None:
        """Refuse to checkpoint weights that are not finite (a checkpoint is a last good state)."""
        for model in filter(None, models):
            named = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
            if not named:
                continue
            # max |x| of each tensor in one batched call: inf or nan exactly when the tensor has one
            peaks = torch.stack(torch._foreach_norm([t for _, t in named], ord=float("inf")))
            for (name, _), peak in zip(named, peaks.tolist()):
                if not math.isfinite(peak):
                    raise TrainingAborted(
                        f"Training aborted at step {step}: the weights are no longer finite ({name}), so they "
                        f"were not checkpointed. The last good checkpoint is {self.last_good_checkpoint}. Lower "
                        "train.optimizer.lr or set train.grad_clip, then resume or restart.", reason="nonfinite_abort"
                    )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, **self.counts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.counts = {kind: int(state.get(kind, 0)) for kind in SKIP_KINDS}
