"""Load a trained detector and predict on image files, through any backend, with optional TTA."""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ImageDraw
from torch import Tensor

from detpact.config import Config, validate_config
from detpact.data.dataset import DetectionDataset, make_loader, resolve_num_workers
from detpact.data.formats import IMAGE_SUFFIXES, Sample, open_rgb
from detpact.data.formats import image_size as image_size_of
from detpact.engine.evaluate import Backend, predict_loader
from detpact.engine.runtime import resolve_device
from detpact.errors import DetpactError
from detpact.evaluation.coco import ImageDetections
from detpact.inference.tta import augment, augmented_size, merge_detections, tta_views, unaugment_boxes
from detpact.models.detector import Detector, build_model
from detpact.models.lora import apply_lora
from detpact.models.lora import merge_lora as merge_lora_layers
from detpact.models.postprocess import Detections
from detpact.models.quant import dequantise_for_inference
from detpact.run.checkpoint import inference_state_dict, load_checkpoint

log = logging.getLogger(__name__)

# Distinct colours for drawn boxes, cycled by class id.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))  # fmt: skip


@dataclass
class LoadedModel:
    """A detector in eval mode, on `device`, with what it was trained with."""

    model: Detector
    config: Config
    class_names: list[str]
    bundle: dict[str, Any]
    device: torch.device


def load_detector(checkpoint: Path, device: torch.device | None = None, merge_lora: bool = True) -> LoadedModel:
    """Build the detector a checkpoint describes and load its inference (EMA) weights.

    The model runs as in training's validation: on the config's device (or `device`),
    in channels_last when the run used it, so evaluating reproduces the logged numbers.
    A run trained with LoRA adapters (train.lora) comes back with them merged into the base
    weights, or as trained with `merge_lora=False` (export compares the ONNX model with that).
    """
    bundle = load_checkpoint(checkpoint)
    cfg = validate_config(bundle["config"], source=f"{checkpoint} (embedded config)")
    device = device or resolve_device(cfg.run.device)
    class_names = list(bundle["class_names"])
    model = float_model(cfg, len(class_names), inference_state_dict(bundle), bundle, merge_lora)
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model.eval(), cfg, class_names, bundle, device)


def float_model(cfg: Config, num_classes: int, state: dict[str, Tensor], bundle: dict[str, Any],
                merge_lora: bool = True) -> Detector:
    """The float detector of a checkpoint's weights `state` (its raw or EMA state dict), on
    the CPU, computing as the run trained: a train.quant run's quantised Linear weights
    become their float values, and LoRA adapters are merged into them (`merge_lora`) or
    kept beside them."""
    model = build_model(cfg.model, num_classes)
    lora = cfg.train.lora
    if lora.r:
        apply_lora(model, lora)
    model.load_state_dict(state)
    dequantise_for_inference(model, (bundle.get("weights") or {}).get("quant"))  # a train.quant run's weights
    if lora.r and merge_lora:
        merged = merge_lora_layers(model)
        log.info("merged the LoRA adapters of %d layers into the base weights", merged)
    return model


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly, found (recursively, sorted) in named folders, or matched
    by glob patterns (`photos/*.jpg`, `data/**/*.png`)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            images = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise DetpactError(f"No images match {item} ({', '.join(IMAGE_SUFFIXES)}).")
            paths += images
        else:
            raise DetpactError(f"Image or folder not found: {item}. Pass image files, folders or glob patterns.")
    if not paths:
        raise DetpactError(f"No images found in {', '.join(map(str, inputs))} ({', '.join(IMAGE_SUFFIXES)}).")
    return paths


@dataclass(frozen=True)
class TTASettings:
    """Test-time augmentation: views (scales x horizontal flip) merged per image."""

    scales: tuple[float, ...] = (1.0, 0.83, 1.17)
    flip: bool = True
    merge: str = "wbf"  # wbf | nms
    iou_threshold: float = 0.55


class TTABackend:
    """A backend that runs `detect` (float images -> detections) on every TTA view of a
    batch, maps the boxes back to the input frame and merges them per image."""

    def __init__(self, detect: Callable[[Tensor], list[Detections]], settings: TTASettings, max_det: int,
                 score_threshold: float, fixed_size: int | None = None):
        self.detect, self.settings, self.max_det, self.score_threshold = detect, settings, max_det, score_threshold
        self.views = tta_views(settings.scales, settings.flip)
        if fixed_size is not None:
            resized = sorted({v.scale for v in self.views if augmented_size(fixed_size, v) != fixed_size})
            if resized:
                raise DetpactError(f"--tta scales {', '.join(map(str, resized))} change the input size, which an "
                                   f"exported ONNX model fixes at {fixed_size}: use --backend torch, or "
                                   "--tta-scales 1.0 (flip only).")

    def __call__(self, images: Tensor) -> list[Detections]:
        x = images.float() / 255.0
        size = x.shape[-1]
        per_image: list[list[Detections]] = [[] for _ in range(len(x))]
        for view in self.views:
            augmented = augment(x, view)
            for views, det in zip(per_image, self.detect(augmented)):
                boxes = unaugment_boxes(det.boxes.float().cpu(), view, size, augmented.shape[-1])
                views.append(Detections(boxes, det.scores.float().cpu(), det.labels.cpu(), det.locations.cpu()))
        merged = [merge_detections(views, self.settings.merge, self.settings.iou_threshold, max_det=self.max_det)
                  for views in per_image]
        # A box that few views found is down-weighted by the fusion: the threshold holds for the result too.
        return [_above(det, self.score_threshold) for det in merged]


def _above(det: Detections, threshold: float) -> Detections:
    keep = det.scores > threshold
    return Detections(det.boxes[keep], det.scores[keep], det.labels[keep], det.locations[keep])


def predict_images(backend: Backend, paths: list[Path], image_size: int, class_names: list[str],
                   batch_size: int, progress: bool = True) -> list[dict]:
    """Predictions per image: {"image", "width", "height", "detections": [{box, score, class_id, class_name}]}
    (docs/predictions.md; `box` is xyxy in the original image's pixels).

    Images go through the same letterbox as validation, in batches of `batch_size`.
    """
    samples = [Sample(path, *image_size_of(path), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
               for path in paths]
    loader = make_loader(DetectionDataset(samples, image_size, train=False), batch_size, resolve_num_workers("auto"))
    detections = predict_loader(backend, loader, progress="predict" if progress else None)
    return [_image_record(sample, det, class_names) for sample, det in zip(samples, detections)]


def _image_record(sample: Sample, det: ImageDetections, class_names: list[str]) -> dict:
    detections = [
        {"box": [round(float(v), 2) for v in box], "score": round(float(score), 5),
         "class_id": int(label), "class_name": class_names[int(label)]}
        for box, score, label in zip(det.boxes, det.scores, det.labels)
    ]
    return {"image": str(sample.image_path), "width": sample.width, "height": sample.height, "detections": detections}


def draw_predictions(records: list[dict], out_dir: Path) -> list[Path]:
    """Save each image with its boxes and labels drawn, as PNG files in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, record in enumerate(records):
        image = open_rgb(Path(record["image"]))
        draw = ImageDraw.Draw(image)
        for det in record["detections"]:
            colour = PALETTE[det["class_id"] % len(PALETTE)]
            x1, y1, x2, y2 = det["box"]
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
            draw.text((x1 + 2, max(0, y1 - 11)), f"{det['class_name']} {det['score']:.2f}", fill=colour)
        # Index prefix: two inputs with the same file name must not overwrite each other.
        target = out_dir / f"{index:04d}_{Path(record['image']).stem}.png"
        image.save(target)
        written.append(target)
    return written
