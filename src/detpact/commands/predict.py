"""`detpact predict`: detections for image files, folders and glob patterns, from a run's
checkpoint (PyTorch) or an exported model (ONNX Runtime), optionally with TTA."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from detpact.commands.runs import checkpoint_path, open_run
from detpact.config import load_config
from detpact.engine.evaluate import TorchBackend
from detpact.errors import DetpactError
from detpact.inference.onnx_backend import OnnxBackend
from detpact.inference.predictions import write_predictions
from detpact.inference.predictor import (
    LoadedModel,
    TTABackend,
    TTASettings,
    collect_images,
    draw_predictions,
    load_detector,
    predict_images,
)
from detpact.robustness.ttt import TTTSettings, wrap_backend

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")


def predict(source: str | Path, images: Sequence[str | Path], *, out: str | Path,
            save_images: str | Path | None = None, checkpoint: str = "best", backend: str | None = None,
            score_threshold: float = 0.25, iou_threshold: float | None = None, max_det: int | None = None,
            batch_size: int | None = None, tta: TTASettings | None = None, progress: bool = True,
            environ: Mapping[str, str] | None = None, ttt: TTTSettings | None = None) -> list[dict]:
    """Detect objects in image files, folders or glob patterns; write a predictions file
    (docs/predictions.md) and, with `save_images`, the images with their boxes drawn.

    source: a run folder (its checkpoint, or with backend "onnxruntime" its exported
    model) or an exported .onnx file. iou_threshold / max_det default to the model's
    postprocessing; `tta` merges predictions over flipped and rescaled views; `ttt` adapts a
    copy of the model to the images while predicting (test-time training, torch backend only).
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise DetpactError(f"--conf must be between 0 and 1, got {score_threshold}.")
    if iou_threshold is not None and not 0.0 < iou_threshold <= 1.0:
        raise DetpactError(f"--iou must be in (0, 1], got {iou_threshold}.")
    if (max_det is not None and max_det < 1) or (batch_size is not None and batch_size < 1):
        raise DetpactError("--max-det and --batch must be at least 1.")
    paths = collect_images(list(images))
    chosen = _prediction_source(source, checkpoint, backend, environ)
    runner = chosen.backend
    post = runner.post_cfg.model_copy(update={"score_threshold": score_threshold,
                                              **({"iou_threshold": iou_threshold} if iou_threshold else {}),
                                              **({"max_det": max_det} if max_det else {})})
    runner.set_postprocess(post)
    run_batch = adapted = wrap_backend(runner, chosen.loaded, ttt)  # runner itself without ttt
    if tta is not None:
        fixed = chosen.image_size if chosen.name == "onnxruntime" else None  # an exported graph's input is fixed
        run_batch = TTABackend(adapted.detect, tta, post.max_det, post.score_threshold, fixed_size=fixed)
    records = predict_images(run_batch, paths, chosen.image_size, chosen.meta["class_names"],
                             batch_size or (ttt.batch_size if ttt else chosen.batch_size), progress)
    meta = {**chosen.meta, "backend": chosen.name, "score_threshold": score_threshold,
            "iou_threshold": post.iou_threshold, "max_det": post.max_det, "tta": asdict(tta) if tta else None,
            "box_format": "xyxy pixels"}
    if ttt is not None:  # what the adaptation did, guard counts included
        meta["ttt"] = adapted.report.as_dict()
        log.info("%s", adapted.report.summary())
    write_predictions(Path(out), records, meta)
    if save_images is not None:
        draw_predictions(records, Path(save_images))
    return records


@dataclass
class _Source:
    """What `predict` runs: the backend, its input size and batch size, and the facts
    about it that go into the predictions file's meta."""

    name: str  # torch | onnxruntime
    backend: Any  # TorchBackend | OnnxBackend
    image_size: int
    batch_size: int
    meta: dict[str, Any]
    loaded: LoadedModel | None = None  # the PyTorch model (torch backend)


def _prediction_source(source: str | Path, checkpoint: str, backend: str | None,
                       environ: Mapping[str, str] | None) -> _Source:
    """What `predict` runs for its source and --backend."""
    if backend not in (None, *BACKENDS):
        raise DetpactError(f"Unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if str(source).endswith(".onnx"):
        if backend == "torch":
            raise DetpactError(f"{source} is an exported model: it runs with --backend onnxruntime, not torch.")
        runner = OnnxBackend(Path(source))
        return _Source("onnxruntime", runner, runner.image_size, 32, {
            "onnx": str(source), "class_names": runner.class_names, "config_hash": runner.meta.get("config_hash")})
    if str(source).endswith(".pt"):  # a checkpoint file outside a run (e.g. from `detpact lora merge`)
        if backend == "onnxruntime":
            raise DetpactError(f"{source} is a checkpoint: it runs with --backend torch; export a run for onnxruntime.")
        return _torch_source(load_detector(Path(source)), {"checkpoint": str(source)})
    run = open_run(source, environ)
    if backend == "onnxruntime":
        if not run.onnx_model.is_file():
            raise DetpactError(f"{run.root} has no exported model ({run.onnx_model} is missing): run "
                               f"`detpact export {run.root}` first, or use --backend torch.")
        runner = OnnxBackend(run.onnx_model)
        return _Source("onnxruntime", runner, runner.image_size, load_config(run.config_resolved).eval.batch_size, {
            "run": str(run.root), "onnx": str(run.onnx_model), "class_names": runner.class_names,
            "config_hash": runner.meta.get("config_hash")})
    return _torch_source(load_detector(checkpoint_path(run, checkpoint)), {"run": str(run.root),
                                                                             "checkpoint": checkpoint})


def _torch_source(loaded: LoadedModel, where: dict[str, Any]) -> _Source:
    cfg = loaded.config
    runner = TorchBackend(loaded.model, cfg.model.postprocess, loaded.device, cfg.run.amp, cfg.run.channels_last)
    return _Source("torch", runner, cfg.data.image_size, cfg.eval.batch_size, {
        **where, "class_names": loaded.class_names, "config_hash": loaded.bundle["config_hash"]}, loaded)
