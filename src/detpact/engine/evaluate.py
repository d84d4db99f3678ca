"""Run a model over a loader and score its detections with COCO mAP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from detpact.config import PostprocessConfig
from detpact.data.formats import Sample
from detpact.data.transforms import Letterbox
from detpact.engine.runtime import autocast
from detpact.evaluation.coco import ImageDetections, ImageGT, evaluate_detections
from detpact.models.postprocess import postprocess


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: DataLoader, post_cfg: PostprocessConfig, device: torch.device, amp: str, channels_last: bool
) -> list[ImageDetections]:
    """Detections for every image of `loader`, mapped back to original-image pixels."""
    was_training = model.training
    model.eval()
    results = []
    for images, targets in loader:
        images = prepare_images(images, device, channels_last)
        with autocast(device, amp):
            out = model(images)
        for det, target in zip(postprocess(out.cls_logits, out.boxes, post_cfg, nms=not model.nms_free), targets):
            height, width = target["orig_size"]
            placement = Letterbox(target["scale"], *target["pad"])
            boxes = placement.to_original(det.boxes.cpu().numpy(), width, height)
            results.append(ImageDetections(target["image_id"], boxes, det.scores.cpu().numpy(), det.labels.cpu().numpy()))
    model.train(was_training)
    return results


def evaluate(
    model: nn.Module, loader: DataLoader, samples: list[Sample], class_names: list[str],
    post_cfg: PostprocessConfig, device: torch.device, amp: str, channels_last: bool,
) -> dict:
    """COCO metrics of `model` on the split behind `loader` (whose image_id = index in `samples`)."""
    detections = predict_loader(model, loader, post_cfg, device, amp, channels_last)
    gts = [
        ImageGT(i, s.width, s.height, s.boxes.astype(np.float64), s.labels, s.ignore) for i, s in enumerate(samples)
    ]
    return evaluate_detections(gts, detections, class_names, max_det=post_cfg.max_det)


def prepare_images(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [0, 1] on `device` (channels_last when asked)."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
