"""What a detector costs: parameters, FLOPs, output maps and CPU forward time."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from detpact.models.detector import Detector, count_parameters


@torch.no_grad()
def model_info(model: Detector, image_size: int, time_runs: int = 5) -> dict[str, Any]:
    """Parameters per part, GFLOPs and the output layout at `image_size`, and the median
    CPU forward time at batch 1 in eval mode (fp32, after one warm-up run).

    GFLOPs count a multiply-add as two operations, over the operators torch's flop counter
    knows (convolutions, matrix products, attention); grid sampling and elementwise
    operations are not counted.
    """
    model = model.eval()
    image = torch.rand(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        out = model(image)
    model(image)  # warm-up
    times = []
    for _ in range(time_runs):
        started = time.perf_counter()
        model(image)
        times.append(time.perf_counter() - started)
    parts = {name: count_parameters(getattr(model, name)) for name in ("backbone", "neck", "projector", "head")}
    return {
        "image_size": image_size,
        "params": count_parameters(model),
        "params_by_part": parts,
        "gflops": counter.get_total_flops() / 1e9,
        "levels": [{"stride": stride, "backbone_channels": channels}
                   for stride, channels in zip(model.backbone.strides, model.backbone.out_channels)],
        "head_channels": list(model.projector.out_channels),
        "outputs": {"boxes": list(out.boxes.shape), "cls_logits": list(out.cls_logits.shape),
                    "decoding": "top-k (NMS-free)" if model.nms_free else "NMS"},
        "cpu_forward_ms": 1000 * statistics.median(times),
        "threads": torch.get_num_threads(),
    }
