"""Export a trained detector to a self-contained ONNX file plus its metadata.

The graph takes letterboxed images and returns decoded boxes and class scores for
every location (pre-NMS), like most deployed YOLO models, or every query of an
NMS-free (rtdetr) model: the postprocessing parameters are part of the metadata and
applied by the consumer (detpact's ORT backend does the same).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detpact import __version__
from detpact.config import Config, PostprocessConfig
from detpact.data.transforms import PAD_VALUE
from detpact.errors import DetpactError
from detpact.models.detector import Detector

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores")


class DeployModel(nn.Module):
    """images [B, 3, S, S] float RGB in [0, 1] -> boxes [B, A, 4] xyxy pixels, scores [B, A, C] in [0, 1]."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.detector(images)
        return out.boxes, out.cls_logits.float().sigmoid()


def export_onnx(deploy: nn.Module, path: Path, image_size: int, opset: int, exporter: str,
                output_names: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Write `path` (weights embedded, dynamic batch) via a temporary file and a rename.

    `deploy` takes images [B, 3, image_size, image_size] (DeployModel, or a test's micro-model
    with its own `output_names`). An operator the exporter cannot convert, and a Resize node
    in a mode not verified against ONNX Runtime (export/resize.py), are DetpactErrors.
    """
    import onnx  # loaded when an export runs: every command imports this module

    from detpact.export.resize import check_resize_modes

    deploy = deploy.eval()
    example = torch.rand(2, 3, image_size, image_size)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_exporter(), _exporter_errors(exporter, opset):
            if exporter == "dynamo":
                torch.onnx.export(
                    deploy, (example,), str(tmp), dynamo=True, verbose=False, external_data=False,
                    input_names=[INPUT_NAME], output_names=list(output_names), opset_version=opset,
                    dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}},
                )
            else:
                torch.onnx.export(
                    deploy, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                    output_names=list(output_names), opset_version=opset,
                    dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
                )
        check_resize_modes(onnx.load(str(tmp), load_external_data=False), str(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _exporter_errors(exporter: str, opset: int):
    """An operator the exporter has no conversion for is a DetpactError naming it."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        op = re.search(r"aten::(\w+)", text)
        if op is None or "not supported" not in text and "No decompositions" not in text:
            raise
        name = op.group(1)
        what = "unsupported resize mode" if "upsample" in name or "interpolate" in name else "unsupported operator"
        raise DetpactError(
            f"{what}: the {exporter} ONNX exporter (opset {opset}) cannot convert aten::{name}. Use the other "
            "exporter (export.exporter: dynamo or torchscript), a newer opset (export.opset), or change the "
            "model's operation." + (" F.interpolate modes nearest, bilinear and bicubic export with both."
                                    if what.startswith("unsupported resize") else "")) from exc


def onnx_metadata(cfg: Config, class_names: list[str], config_hash: str, checkpoint: str, nms_free: bool = False,
                  opset: int | None = None, in_graph: bool = False) -> dict[str, Any]:
    """Everything a consumer needs to feed the model and read its outputs."""
    size = cfg.data.image_size
    post = cfg.model.postprocess
    candidates = "queries" if nms_free else "locations"
    if in_graph:
        outputs = {
            "boxes": {"shape": ["batch", post.max_det, 4], "format": "xyxy, letterboxed-input pixels"},
            "scores": {"shape": ["batch", post.max_det], "format": "probability (sigmoid)"},
            "labels": {"shape": ["batch", post.max_det], "format": "class id (index into class_names); -1 = padding"},
            "num_dets": {"shape": ["batch"], "format": "detections per image: the first num_dets rows, best first"},
        }
    else:
        outputs = {
            "boxes": {"shape": ["batch", candidates, 4], "format": "xyxy, letterboxed-input pixels"},
            "scores": {"shape": ["batch", candidates, len(class_names)], "format": "per-class probability (sigmoid)"},
        }
    return {
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "preprocessing": {
            "letterbox": {"size": size, "keep_aspect_ratio": True, "centered": True, "pad_value": PAD_VALUE},
            "color": "RGB", "layout": "NCHW", "scale": "1/255 (pixel values in [0, 1])",
        },
        "outputs": outputs,
        "postprocessing": {**_postprocessing(post, nms_free), "in_graph": in_graph},
        "class_names": list(class_names),
        "config_hash": config_hash,
        "checkpoint": checkpoint,
        "opset": opset or cfg.export.opset,
        "exporter": cfg.export.exporter,
        "detpact_version": __version__,
        "torch_version": torch.__version__,
    }


def _postprocessing(post: PostprocessConfig, nms_free: bool) -> dict[str, Any]:
    """How a consumer turns the outputs into detections, as detpact does."""
    if nms_free:  # one query per object: no NMS
        return {"nms": "none", "method": "the top max_det of queries x classes above score_threshold",
                "score_threshold": post.score_threshold, "max_det": post.max_det}
    return {"nms": "class-wise, greedy", "score_threshold": post.score_threshold,
            "iou_threshold": post.iou_threshold, "max_det": post.max_det, "pre_nms_topk": post.pre_nms_topk}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs about optional torchvision ops and deprecations; not the user's concern."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
