"""`run:` seed, device, precision, determinism, output folder."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from detpact.config.section import Section


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision for forward/backward. bf16 works on CPU and recent GPUs;
    # fp16 is CUDA-only and uses a gradient scaler.
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    deterministic: bool = True
    # Intra-op CPU threads; None = torch's default for the machine. Always fixed and
    # recorded (CPU bits depend on it); a resume reuses the checkpoint's count unless set.
    num_threads: int | None = Field(None, ge=1)
    output_root: str | None = None
