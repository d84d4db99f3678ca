"""An exported ONNX model as a detection backend (ONNX Runtime, CPU).

It reads `model.onnx.meta.json` beside the file for the input size, the class names and
the postprocessing; a model exported with `--nms` already returns final detections, a
raw one gets the same postprocessing as PyTorch (models/postprocess.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from detpact.config import PostprocessConfig
from detpact.errors import DetpactError
from detpact.export.onnx import INPUT_NAME
from detpact.models.postprocess import Detections, postprocess_scores


def meta_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".meta.json")


def read_meta(onnx_path: Path) -> dict[str, Any]:
    """The metadata detpact wrote beside an exported model, or a clear error."""
    path = meta_path(onnx_path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetpactError(f"{onnx_path} has no {path.name} beside it: detpact needs the metadata its export "
                           "writes (input size, class names, postprocessing). Export with `detpact export RUN`.") from None
    except (OSError, ValueError) as exc:
        raise DetpactError(f"Cannot read {path}: {exc}. Export the model again with `detpact export RUN`.") from None
    if not isinstance(meta, dict) or "class_names" not in meta or "input" not in meta:
        raise DetpactError(f"{path} is not detpact export metadata (no class_names / input). Export the model again.")
    return meta


class OnnxBackend:
    """uint8 letterboxed images [B, 3, S, S] -> detections, through ONNX Runtime."""

    def __init__(self, onnx_path: Path, post_cfg: PostprocessConfig | None = None, threads: int | None = None):
        if not onnx_path.is_file():
            raise DetpactError(f"ONNX model not found: {onnx_path}.")
        self.meta = read_meta(onnx_path)
        self.class_names: list[str] = list(self.meta["class_names"])
        self.image_size = int(self.meta["input"]["shape"][-1])
        post = self.meta["postprocessing"]
        self.in_graph = bool(post.get("in_graph", False))
        self.nms = post.get("nms", "none") != "none"
        self.path = onnx_path
        self.stored = PostprocessConfig(**{k: post[k] for k in PostprocessConfig.model_fields if k in post})
        self.post_cfg = self.stored
        if post_cfg is not None:
            self.set_postprocess(post_cfg)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise DetpactError(f"ONNX Runtime cannot load {onnx_path}: {exc}".splitlines()[0]) from None

    def set_postprocess(self, post_cfg: PostprocessConfig) -> None:
        """Postprocess with `post_cfg` instead of the export's settings. A graph with its
        postprocessing inside can only keep fewer detections: a higher score threshold,
        a lower max_det."""
        if self.in_graph and not _narrower(post_cfg, self.stored, self.nms):
            raise DetpactError(f"{self.path} was exported with its postprocessing inside the graph "
                               f"({_describe(self.stored)}): at run time only a higher score threshold or a lower "
                               f"max_det can be applied, not {_describe(post_cfg)}. Export again with the "
                               "thresholds you need, or export without --nms.")
        self.post_cfg = post_cfg

    def __call__(self, images: Tensor) -> list[Detections]:
        return self.detect(images.float() / 255.0)

    def detect(self, images: Tensor) -> list[Detections]:
        """Detections of float images [B, 3, S, S] in [0, 1], S the exported input size."""
        feed = {INPUT_NAME: images.numpy().astype(np.float32, copy=False)}
        if self.in_graph:
            boxes, scores, labels, counts = self.session.run(["boxes", "scores", "labels", "num_dets"], feed)
            empty = torch.zeros(0, dtype=torch.int64)
            post = self.post_cfg
            kept = [min(int((s[:n] > post.score_threshold).sum()), post.max_det)  # rows are best first
                    for s, n in zip(scores, counts.tolist())]
            return [Detections(torch.from_numpy(b[:n]), torch.from_numpy(s[:n]), torch.from_numpy(lab[:n]),
                               empty.new_full((n,), -1))
                    for b, s, lab, n in zip(boxes, scores, labels, kept)]
        boxes, scores = self.session.run(["boxes", "scores"], feed)
        return postprocess_scores(torch.from_numpy(scores), torch.from_numpy(boxes), self.post_cfg, self.nms)


def _narrower(wanted: PostprocessConfig, stored: PostprocessConfig, nms: bool) -> bool:
    """Whether `wanted` only keeps fewer of the detections the graph's `stored` settings keep."""
    same_nms = not nms or (wanted.iou_threshold == stored.iou_threshold and wanted.pre_nms_topk == stored.pre_nms_topk)
    return same_nms and wanted.score_threshold >= stored.score_threshold and wanted.max_det <= stored.max_det


def _describe(post: PostprocessConfig) -> str:
    return (f"score_threshold {post.score_threshold}, iou_threshold {post.iou_threshold}, max_det {post.max_det}, "
            f"pre_nms_topk {post.pre_nms_topk}")
