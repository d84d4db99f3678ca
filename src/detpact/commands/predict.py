"""`detpact predict`: detections for image files, folders and glob patterns, from a run's
checkpoint (PyTorch) or an exported model (ONNX Runtime), optionally with TTA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from detpact.commands.runs import checkpoint_path, open_run
from detpact.config import load_config
from detpact.engine.evaluate import TorchBackend
from detpact.errors import DetpactError
from detpact.inference.onnx_backend import OnnxBackend
from detpact.inference.predictions import write_predictions
from detpact.inference.predictor import (
    TTABackend,
    TTASettings,
    collect_images,
    draw_predictions,
    load_detector,
    predict_images,
)

BACKENDS = ("torch", "onnxruntime")


def predict(source: str | Path, images: Sequence[str | Path], *, out: str | Path,
            save_images: str | Path | None = None, checkpoint: str = "best", backend: str | None = None,
            score_threshold: float = 0.25, iou_threshold: float | None = None, max_det: int | None = None,
            batch_size: int | None = None, tta: TTASettings | None = None, progress: bool = True,
            environ: Mapping[str, str] | None = None) -> list[dict]:
    """Detect objects in image files, folders or glob patterns; write a predictions file
    (docs/predictions.md) and, with `save_images`, the images with their boxes drawn.

    source: a run folder (its checkpoint, or with backend "onnxruntime" its exported
    model) or an exported .onnx file. iou_threshold / max_det default to the model's
    postprocessing; `tta` merges predictions over flipped and rescaled views.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise DetpactError(f"--conf must be between 0 and 1, got {score_threshold}.")
    if iou_threshold is not None and not 0.0 < iou_threshold <= 1.0:
        raise DetpactError(f"--iou must be in (0, 1], got {iou_threshold}.")
    if (max_det is not None and max_det < 1) or (batch_size is not None and batch_size < 1):
        raise DetpactError("--max-det and --batch must be at least 1.")
    paths = collect_images(list(images))
    chosen, runner, meta = _prediction_backend(source, checkpoint, backend, environ)
    post = runner.post_cfg.model_copy(update={"score_threshold": score_threshold,
                                              **({"iou_threshold": iou_threshold} if iou_threshold else {}),
                                              **({"max_det": max_det} if max_det else {})})
    runner.set_postprocess(post)
    image_size = runner.image_size if chosen == "onnxruntime" else meta.pop("image_size")
    run_batch = runner
    if tta is not None:
        run_batch = TTABackend(runner.detect, tta, post.max_det, post.score_threshold,
                               fixed_size=image_size if chosen == "onnxruntime" else None)
    records = predict_images(run_batch, paths, image_size, meta["class_names"], batch_size or meta.pop("batch_size"),
                             progress)
    meta.update(backend=chosen, score_threshold=score_threshold, iou_threshold=post.iou_threshold,
                max_det=post.max_det, tta=asdict(tta) if tta else None, box_format="xyxy pixels")
    write_predictions(Path(out), records, meta)
    if save_images is not None:
        draw_predictions(records, Path(save_images))
    return records


def _prediction_backend(source: str | Path, checkpoint: str, backend: str | None,
                        environ: Mapping[str, str] | None) -> tuple[str, Any, dict[str, Any]]:
    """(backend name, backend, predictions meta) for `predict`'s source."""
    if backend not in (None, *BACKENDS):
        raise DetpactError(f"Unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if str(source).endswith(".onnx"):
        if backend == "torch":
            raise DetpactError(f"{source} is an exported model: it runs with --backend onnxruntime, not torch.")
        runner = OnnxBackend(Path(source))
        return "onnxruntime", runner, {"onnx": str(source), "class_names": runner.class_names,
                                       "config_hash": runner.meta.get("config_hash"), "batch_size": 32}
    run = open_run(source, environ)
    if backend == "onnxruntime":
        if not run.onnx_model.is_file():
            raise DetpactError(f"{run.root} has no exported model ({run.onnx_model} is missing): run "
                               f"`detpact export {run.root}` first, or use --backend torch.")
        runner = OnnxBackend(run.onnx_model)
        return "onnxruntime", runner, {"run": str(run.root), "onnx": str(run.onnx_model),
                                       "class_names": runner.class_names, "config_hash": runner.meta.get("config_hash"),
                                       "batch_size": load_config(run.config_resolved).eval.batch_size}
    loaded = load_detector(checkpoint_path(run, checkpoint))
    cfg = loaded.config
    runner = TorchBackend(loaded.model, cfg.model.postprocess, loaded.device, cfg.run.amp, cfg.run.channels_last)
    return "torch", runner, {"run": str(run.root), "checkpoint": checkpoint, "class_names": loaded.class_names,
                             "config_hash": loaded.bundle["config_hash"], "image_size": cfg.data.image_size,
                             "batch_size": cfg.eval.batch_size}
