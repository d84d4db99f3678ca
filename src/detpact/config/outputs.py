"""`eval:`, `export:` and `logging:`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from detpact.config.section import Section


class EvalConfig(Section):
    every_epochs: int = Field(1, ge=1)
    # Also validate every N optimizer steps (mid-epoch too); None = only by epochs.
    every_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    # The operating point reported beside COCO mAP: precision, recall, F1 and the mean
    # IoU of matches of the detections scoring >= score_threshold, matched at iou_threshold.
    score_threshold: float = Field(0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0)


class ExportConfig(Section):
    onnx: bool = True
    # dynamo: torch.export-based exporter (PyTorch's supported path, ~10 s);
    # torchscript: the legacy tracer (deprecated upstream, under a second).
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int = Field(18, ge=13)
    parity_policy: Literal["fail", "warn"] = "fail"
    parity_images: int = Field(8, ge=1)
    # Also evaluate the ONNX model on the validation split and require its mAP .50:.95
    # within parity_map_tol of PyTorch's (fp32, CPU); parity_map_images caps the images
    # (null: the whole split).
    parity_map: bool = True
    parity_map_tol: float = Field(1e-3, ge=0.0)
    parity_map_images: int | None = Field(None, ge=1)
    # Put the postprocessing inside the graph: outputs boxes [B, max_det, 4], scores and
    # labels [B, max_det] and num_dets [B] (detections are the first num_dets rows).
    nms: bool = False
    # float16 weights and activations; CUDA only (ONNX Runtime's CPU kernels lack fp16).
    half: bool = False
    # Raw outputs pass when |onnxruntime - torch| <= atol + rtol * |torch| everywhere
    # (box coordinates: rtol relative to max(|torch|, image size); see export/parity.py).
    parity_rtol: float = Field(1e-3, gt=0.0)
    parity_atol: float = Field(1e-5, gt=0.0)


class MlflowConfig(Section):
    # Where runs go: a server's http(s):// URI, or a local store (file: path, sqlite:///...);
    # null = MLflow's own default ($MLFLOW_TRACKING_URI, else its local store).
    tracking_uri: str | None = None
    # The MLflow experiment the run is logged under (created when missing).
    experiment: str = "detpact"
    # Register checkpoints/best.pt in MLflow's model registry under this name (a new
    # version per run) when training succeeds; null = do not register.
    register_model: str | None = None
    # MLflow's HTTP client: seconds per request and retries (MLFLOW_HTTP_REQUEST_TIMEOUT and
    # _MAX_RETRIES for this process), so that a server that is down cannot stall a run.
    timeout_s: float = Field(10.0, gt=0.0)
    max_retries: int = Field(1, ge=0)


class LoggingConfig(Section):
    progress: bool = True
    status_every_s: float = Field(2.0, gt=0.0)
    # Also write reports/train_metrics.csv (the rows of train_metrics.jsonl, for
    # spreadsheets) when training ends.
    metrics_csv: bool = False
    # Write TensorBoard event files under the run's tensorboard/ folder (needs the
    # `tracking` extra: pip install 'detpact[tracking]').
    tensorboard: bool = False
    # Log the run to MLflow (params, metrics, tags, artifacts); null = off. Needs the
    # `tracking` extra. A tracker that fails is reported and never stops training.
    mlflow: MlflowConfig | None = None
    # After training (and after `detpact eval` on the run's data), draw the plots into
    # reports/ and write the self-contained reports/report.html. After training this
    # evaluates best.pt once more on the validation split (for the PR curves, confusion
    # matrix and image grid). `detpact report RUN` writes them at any time.
    reports: bool = True
