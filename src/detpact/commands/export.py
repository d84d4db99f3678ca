"""`detpact export`: a run's checkpoint to exports/model.onnx, proven to behave like it.

The parity gate (export/parity.py) compares ONNX Runtime with PyTorch on real
validation images: raw outputs elementwise, detections after postprocessing, the
in-graph postprocessing when there is one, and the mAP of both on the validation split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from detpact.config import Config, ExportConfig
from detpact.data.build import DatasetSplits
from detpact.data.dataset import DetectionDataset, eval_loader
from detpact.engine.evaluate import TorchBackend, predict_loader, prepare_images, score
from detpact.errors import CheckFailed, DetpactError
from detpact.export.nms_graph import RAW, append_postprocess
from detpact.export.onnx import DeployModel, export_onnx, onnx_metadata
from detpact.export.parity import check_parity, describe_failure
from detpact.inference.onnx_backend import OnnxBackend
from detpact.inference.predictor import LoadedModel
from detpact.models.lora import merged_copy
from detpact.run.atomic import atomic_open, atomic_write_json
from detpact.run.contract import RunDir

log = logging.getLogger(__name__)


def export_run(run: RunDir, loaded: LoadedModel, data: DatasetSplits, checkpoint: Path, *,
               opset: int | None = None, nms: bool | None = None, half: bool | None = None) -> dict[str, Any]:
    """Export `loaded` (float32, CPU) into the run and gate it; returns the parity report.

    `opset`, `nms` and `half` override the config's export section. Writes
    exports/model.onnx, model.onnx.meta.json and reports/onnx_parity.json; a failed gate
    raises CheckFailed under `export.parity_policy: fail`.
    """
    cfg = loaded.config
    opset = cfg.export.opset if opset is None else opset
    nms = cfg.export.nms if nms is None else nms
    check_export_settings(cfg.export, opset, cfg.export.half if half is None else half)
    loaded.model.mim_decoder = None  # model.mim_decoder serves test-time training only: not exported
    # With LoRA adapters the merged model is exported and gated against the adapted one as trained.
    deploy = DeployModel(loaded.model)
    exported = DeployModel(merged_copy(loaded.model))
    started = time.perf_counter()
    log.info("exporting %s to %s (%s exporter, opset %d%s)", checkpoint, run.onnx_model, cfg.export.exporter, opset,
             ", postprocessing in the graph" if nms else "")
    export_onnx(exported, run.onnx_model, cfg.data.image_size, opset, cfg.export.exporter)
    try:
        onnx.checker.check_model(str(run.onnx_model))
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"The {cfg.export.exporter} exporter wrote an invalid model at opset {opset}: "
                          f"{str(exc).splitlines()[0]}. Try another export.opset or export.exporter.") from None
    checked: str | bytes = str(run.onnx_model)
    if nms:
        model = append_postprocess(onnx.load(str(run.onnx_model)), cfg.model.postprocess, not loaded.model.nms_free)
        _save_onnx(model, run.onnx_model)
        checked = _with_raw_outputs(model).SerializeToString()
    meta = onnx_metadata(cfg, loaded.class_names, loaded.bundle["config_hash"], str(checkpoint.relative_to(run.root)),
                         loaded.model.nms_free, opset, in_graph=nms)
    atomic_write_json(run.onnx_meta, meta)

    parity_samples = data.val[: cfg.export.parity_images]
    dataset = DetectionDataset(parity_samples, cfg.data.image_size, train=False)
    images = prepare_images(torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.device("cpu"), False)
    report = check_parity(deploy, checked, images.numpy(), cfg.model.postprocess, cfg.export.parity_rtol,
                          cfg.export.parity_atol, in_graph=nms)
    if cfg.export.parity_map:
        report["map"] = map_parity(run.onnx_model, loaded, data, cfg)
        if not report["map"]["pass"]:
            report["verdict"] = "fail"
    report = {"onnx": str(run.onnx_model.relative_to(run.root)), "policy": cfg.export.parity_policy,
              "opset": opset, "in_graph_postprocessing": nms, "images": [str(s.image_path) for s in parity_samples],
              "export_seconds": round(time.perf_counter() - started, 2), **report}
    atomic_write_json(run.onnx_parity, report)
    worst = {name: max(c["outputs"][name]["max_abs"] for c in report["checks"]) for name in ("boxes", "scores")}
    accuracy = f", mAP diff {report['map']['diff']:.2e}" if "map" in report else ""
    log.info("ONNX parity %s on %d images (max |diff| boxes %.2e, scores %.2e%s)", report["verdict"].upper(),
             len(images), worst["boxes"], worst["scores"], accuracy)
    if report["verdict"] != "pass":
        message = f"ONNX parity check failed for {run.onnx_model}: {describe_failure(report)}. Details: {run.onnx_parity}."
        if cfg.export.parity_policy == "fail":
            raise CheckFailed(message)
        log.warning("%s (export.parity_policy is 'warn', continuing)", message)
    return report


def check_export_settings(export_cfg: ExportConfig, opset: int, half: bool) -> None:
    """Refuse what cannot be exported here, before any work (training checks it at its start)."""
    if half:
        if not torch.cuda.is_available():
            raise DetpactError("export --half (export.half) needs a CUDA device, and this machine has none: a float16 "
                               "model is exported and parity-checked on the GPU. Export in float32 (the default).")
        raise DetpactError("export --half (export.half) is not available yet: detpact exports float32 models only. "
                           "Export in float32, or convert the exported model with onnxconverter-common.")
    if opset < 13:
        raise DetpactError(f"--opset must be at least 13, got {opset}.")
    if opset < 18 and export_cfg.exporter == "dynamo":
        raise DetpactError(f"The dynamo exporter writes opset 18 and newer; opset {opset} needs "
                           "export.exporter: torchscript (in the run's config), or export with --opset 18.")


def map_parity(onnx_path: Path, loaded: LoadedModel, data: DatasetSplits, cfg: Config) -> dict[str, Any]:
    """mAP .50:.95 of the ONNX model and of PyTorch (float32, CPU) on the validation split."""
    samples = data.val[: cfg.export.parity_map_images]
    loader = eval_loader(samples, cfg.data, cfg.eval.batch_size)
    post = cfg.model.postprocess
    torch_dets = predict_loader(TorchBackend(loaded.model.float(), post, torch.device("cpu"), "none", False), loader)
    onnx_dets = predict_loader(OnnxBackend(onnx_path), loader)
    values = {name: score(samples, dets, data.class_names, post.max_det, cfg.eval)["map50_95"]
              for name, dets in (("torch", torch_dets), ("onnx", onnx_dets))}
    if values["torch"] is None:  # no ground truth: nothing to compare
        return {"images": len(samples), **values, "diff": 0.0, "tolerance": cfg.export.parity_map_tol, "pass": True}
    diff = abs(values["onnx"] - values["torch"])
    return {"images": len(samples), **values, "diff": diff, "tolerance": cfg.export.parity_map_tol,
            "pass": diff <= cfg.export.parity_map_tol}


def _with_raw_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an in-graph-postprocessing model that also outputs the raw boxes and scores."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                             for name in RAW.values())
    return copy


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    with atomic_open(path) as handle:
        handle.write(model.SerializeToString())
