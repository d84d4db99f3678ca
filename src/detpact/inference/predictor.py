"""Load a trained detector from a run and predict on image files (torch backend)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ImageDraw

from detpact.config import Config, PostprocessConfig, validate_config
from detpact.data.dataset import eval_loader
from detpact.data.formats import IMAGE_SUFFIXES, Sample, image_size, open_rgb
from detpact.engine.evaluate import predict_loader
from detpact.engine.runtime import resolve_device
from detpact.errors import DetpactError
from detpact.evaluation.coco import ImageDetections
from detpact.models.detector import Detector, build_model
from detpact.run.checkpoint import inference_state_dict, load_checkpoint

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


def load_detector(checkpoint: Path, device: torch.device | None = None) -> LoadedModel:
    """Build the detector a checkpoint describes and load its inference (EMA) weights.

    The model runs as in training's validation: on the config's device (or `device`),
    in channels_last when the run used it, so evaluating reproduces the logged numbers.
    """
    bundle = load_checkpoint(checkpoint)
    cfg = validate_config(bundle["config"], source=f"{checkpoint} (embedded config)")
    device = device or resolve_device(cfg.run.device)
    class_names = list(bundle["class_names"])
    model = build_model(cfg.model, len(class_names))
    model.load_state_dict(inference_state_dict(bundle))
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model.eval(), cfg, class_names, bundle, device)


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in named folders."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise DetpactError(f"Image or folder not found: {item}. Pass image files or folders of images.")
    if not paths:
        raise DetpactError(f"No images found in {', '.join(map(str, inputs))} ({', '.join(IMAGE_SUFFIXES)}).")
    return paths


def predict_images(loaded: LoadedModel, paths: list[Path], post_cfg: PostprocessConfig) -> list[dict]:
    """Predictions per image: {"image", "width", "height", "detections": [{box, score, class_id, class_name}]}
    (docs/predictions.md; `box` is xyxy in the original image's pixels).

    Images go through the same letterbox, precision and postprocessing as validation.
    """
    samples = [Sample(path, *image_size(path), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for path in paths]
    cfg = loaded.config
    loader = eval_loader(samples, cfg.data, cfg.eval.batch_size)
    detections = predict_loader(loaded.model, loader, post_cfg, loaded.device, cfg.run.amp, cfg.run.channels_last)
    return [_image_record(sample, det, loaded.class_names) for sample, det in zip(samples, detections)]


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
