"""Run a detector over a loader and score its detections: COCO mAP and the operating point.

A *backend* turns a batch of letterboxed uint8 images into detections in input-image
pixels: the PyTorch model (`TorchBackend`) or an exported ONNX file
(inference/onnx_backend.py). Training's validation, `eval`, `predict` and the export's
parity gate all go through `predict_loader` and `score`, so one evaluator serves them all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from detpact.config import EvalConfig, PostprocessConfig
from detpact.data.formats import Sample
from detpact.data.transforms import Letterbox
from detpact.engine.progress import progress_bar
from detpact.engine.runtime import autocast
from detpact.evaluation.coco import ImageDetections, ImageGT, evaluate_detections
from detpact.evaluation.operating import operating_point
from detpact.models.postprocess import Detections, postprocess

# uint8 images [B, 3, S, S] -> each image's detections in input (letterboxed) pixels
Backend = Callable[[Tensor], list[Detections]]


class TorchBackend:
    """A PyTorch detector as a backend, run as validation runs it (precision, memory format)."""

    def __init__(self, model: nn.Module, post_cfg: PostprocessConfig, device: torch.device, amp: str,
                 channels_last: bool):
        self.model, self.post_cfg, self.device = model, post_cfg, device
        self.amp, self.channels_last = amp, channels_last

    def set_postprocess(self, post_cfg: PostprocessConfig) -> None:
        self.post_cfg = post_cfg

    def __call__(self, images: Tensor) -> list[Detections]:
        return self.detect(prepare_images(images, self.device, self.channels_last))

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[Detections]:
        """Detections of float images [B, 3, H, W] in [0, 1] (any size the model takes)."""
        images = images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            out = self.model(images)
        return postprocess(out.cls_logits, out.boxes, self.post_cfg, nms=not self.model.nms_free)


def predict_loader(backend: Backend, loader: DataLoader, progress: str | None = None) -> list[ImageDetections]:
    """Detections for every image of `loader`, mapped back to original-image pixels
    (`progress`: the label of a progress bar to show)."""
    results = []
    with progress_bar(progress or "", len(loader.dataset), enabled=progress is not None) as bar:
        for images, targets in loader:
            for det, target in zip(backend(images), targets):
                height, width = target["orig_size"]
                placement = Letterbox(target["scale"], *target["pad"])
                boxes = placement.to_original(det.boxes.cpu().numpy(), width, height)
                results.append(ImageDetections(target["image_id"], boxes, det.scores.cpu().numpy(),
                                               det.labels.cpu().numpy()))
            bar.advance(len(targets))
    return results


def ground_truth(samples: list[Sample]) -> list[ImageGT]:
    """The evaluator's records of `samples` (image_id = index in `samples`)."""
    return [ImageGT(i, s.width, s.height, s.boxes.astype(np.float64), s.labels, s.ignore) for i, s in enumerate(samples)]


def score(samples: list[Sample], detections: list[ImageDetections], class_names: list[str], max_det: int,
          eval_cfg: EvalConfig, curves: bool = False) -> dict:
    """COCO metrics of `detections` (image_id = index in `samples`), with the operating
    point at eval_cfg's thresholds under `operating_point` (`curves`: and `pr_curves`)."""
    gts = ground_truth(samples)
    metrics = evaluate_detections(gts, detections, class_names, max_det=max_det, curves=curves)
    metrics["operating_point"] = operating_point(gts, detections, class_names, eval_cfg.score_threshold,
                                                 eval_cfg.iou_threshold)
    return metrics


def evaluate(
    model: nn.Module, loader: DataLoader, samples: list[Sample], class_names: list[str],
    post_cfg: PostprocessConfig, device: torch.device, amp: str, channels_last: bool,
    eval_cfg: EvalConfig | None = None,
) -> dict:
    """COCO metrics of `model` on the split behind `loader` (whose image_id = index in `samples`)."""
    was_training = model.training
    detections = predict_loader(TorchBackend(model.eval(), post_cfg, device, amp, channels_last), loader)
    model.train(was_training)
    return score(samples, detections, class_names, post_cfg.max_det, eval_cfg or EvalConfig())


def prepare_images(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [0, 1] on `device` (channels_last when asked)."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
