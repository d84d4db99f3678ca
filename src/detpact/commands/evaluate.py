"""`detpact eval`: COCO mAP and the operating point of a checkpoint, an ONNX file or a
predictions file, on a run's validation split or another dataset.

What is evaluated (a *source*) and what it is evaluated on (a split) are independent:
every source yields detections per image of the split, and `engine.evaluate.score`
scores them, as training's validation does.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detpact.commands.record import record_run_of
from detpact.commands.runs import cache_dir, checkpoint_path, open_run, run_data
from detpact.config import DataConfig, EvalConfig, config_hash, diff_configs, is_config_file, load_config
from detpact.data.build import DatasetSplits, build_datasets
from detpact.data.dataset import eval_loader
from detpact.data.formats import Sample
from detpact.engine.evaluate import TorchBackend, predict_loader, score
from detpact.engine.runtime import setup_determinism
from detpact.errors import DetpactError
from detpact.evaluation.coco import ImageDetections, ImageGT, evaluate_coco_json, to_coco_gt
from detpact.evaluation.operating import operating_point
from detpact.inference.onnx_backend import OnnxBackend
from detpact.inference.predictions import coco_results_for, load_json
from detpact.inference.predictor import LoadedModel, load_detector
from detpact.robustness.ttt import TTTBackend, TTTSettings, ttt_backend
from detpact.run.atomic import atomic_write_json, read_json
from detpact.run.contract import RunDir, utc_now, write_manifest
from detpact.run.reporting import ValEvaluation, write_reports

log = logging.getLogger(__name__)

EVAL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def eval_settings(eval_cfg: EvalConfig, score_threshold: float | None, iou_threshold: float | None) -> EvalConfig:
    """`eval_cfg` with the command line's operating point, checked like the config keys."""
    update = {key: value for key, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold))
              if value is not None}
    try:
        return EvalConfig.model_validate({**eval_cfg.model_dump(), **update})
    except ValueError as exc:
        raise DetpactError(f"Invalid --score-threshold / --iou-threshold: {exc.errors()[0]['msg']} "
                           "(both are between 0 and 1).") from None


def first_images(samples: list[Sample], max_images: int | None) -> list[Sample]:
    """The first `max_images` samples of a split (all when None), in the split's order."""
    if max_images is None:
        return samples
    if max_images < 1:
        raise DetpactError(f"--max-images must be at least 1, got {max_images}.")
    return samples[:max_images]


def dataset_config(target: Path, image_size: int) -> DataConfig:
    """The data section that `--data TARGET` names, at the model's input size: a detpact
    config's, or for a dataset folder or an Ultralytics dataset YAML, a YOLO dataset."""
    if is_config_file(target):
        return load_config(target).data.model_copy(update={"image_size": image_size})
    if not target.is_dir() and not target.is_file():
        raise DetpactError(f"--data {target}: not found. Pass a detpact config, a dataset YAML or a dataset folder.")
    return DataConfig(format="yolo", path=str(target), image_size=image_size)


def other_data(class_names: list[str], data_cfg: DataConfig, cache: Path, target: Path) -> DatasetSplits:
    """Another dataset to evaluate on: its classes must be the model's, in the same order."""
    data = build_datasets(data_cfg, cache)
    if data.class_names != class_names:
        raise DetpactError(f"The dataset of {target} has other classes than the model ({len(data.class_names)}: "
                           f"{', '.join(data.class_names[:4])}, ... vs {len(class_names)}: "
                           f"{', '.join(class_names[:4])}, ...). Evaluate on a dataset with the same class list, "
                           "in the same order.")
    return data


def predictions_on(path: Path, samples: list[Sample], class_names: list[str], bbox_format: str
                   ) -> list[ImageDetections]:
    """A predictions file's detections for each sample (image_id = index), its images
    matched by path or file name; a sample it does not name has no detections."""
    gts = [ImageGT(i, s.width, s.height, s.boxes, s.labels, s.ignore) for i, s in enumerate(samples)]
    gt = to_coco_gt(gts, class_names)
    for image, sample in zip(gt["images"], samples):
        image["file_name"] = str(sample.image_path)
    return _coco_records(gt, coco_results_for(path, gt, bbox_format))[1]


def report_name(name: str) -> str:
    """reports/eval_<name>.json for a checkpoint or model name, kept to safe file-name characters."""
    cleaned = "".join(c if c in EVAL_NAME_CHARS else "_" for c in name).strip(".") or "model"
    return f"eval_{cleaned}.json"


def evaluate(run_dir: str | Path, *, checkpoint: str = "best", environ: Mapping[str, str] | None = None,
             verify_config: str | Path | None = None, data: str | Path | None = None, out: str | Path | None = None,
             max_images: int | None = None, score_threshold: float | None = None,
             iou_threshold: float | None = None, ttt: TTTSettings | None = None) -> dict[str, Any]:
    """COCO metrics and the operating point of a run's checkpoint on its validation split;
    writes reports/eval_<checkpoint>.json.

    data: evaluate on the validation split of this config's dataset, or of this dataset
    folder / dataset YAML, instead (same classes required); the run folder is then left
    untouched and the report goes to `out` only. max_images: the first N images of the
    split. score_threshold / iou_threshold: the operating point (default: the config's `eval:`).
    ttt: adapt a copy of the model to the split while predicting (test-time training); the
    report, with what the adaptation did under "ttt", is then eval_<checkpoint>_ttt.json.
    """
    run = open_run(run_dir, environ)
    loaded = load_detector(checkpoint_path(run, checkpoint))
    if verify_config is not None:
        verify_config_hash(loaded, Path(verify_config))
    cfg = loaded.config
    eval_cfg = eval_settings(cfg.eval, score_threshold, iou_threshold)
    splits, samples = _split_of(loaded, data, max_images, environ)
    adapted = _ttt_backend(loaded, ttt)
    started = time.perf_counter()
    detections = predict_as_trained(run, loaded, samples, adapted)
    metrics = score(samples, detections, splits.class_names, cfg.model.postprocess.max_det, eval_cfg, curves=True)
    pr_curves = metrics.pop("pr_curves")  # for the plot only: the report keeps the metrics as validation logs them
    step = loaded.bundle["progress"]["global_step"]
    report = {"source": {"checkpoint": checkpoint, "path": str(checkpoint_path(run, checkpoint))},
              **_eval_facts(splits, samples, data, started),
              "config_hash": loaded.bundle["config_hash"], "step": step, "metrics": metrics}
    if adapted is not None:  # what the adaptation did, guard counts included
        report["ttt"] = adapted.report.as_dict()
        log.info("%s", adapted.report.summary())
    _write_eval_report(report, run if data is None else None, checkpoint + ("_ttt" if adapted else ""), out)
    if data is None and cfg.logging.reports and adapted is None:  # the run's own data: the evaluation plots follow
        write_reports(run, ValEvaluation(f"{checkpoint}.pt at step {step}, {len(samples)} validation images",
                                         samples, detections, pr_curves, splits.class_names, eval_cfg))
    if data is None:  # the run keeps the report: the registry records it (never raises)
        record_run_of(run, environ)
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, *, data: str | Path | None = None, out: str | Path | None = None,
                        max_images: int | None = None, score_threshold: float | None = None,
                        iou_threshold: float | None = None, environ: Mapping[str, str] | None = None,
                        ttt: TTTSettings | None = None) -> dict[str, Any]:
    """COCO metrics and the operating point of a checkpoint file outside a run (a `detpact
    lora merge` output, a copied best.pt) on the validation split of `data`, or of the
    dataset its embedded config names; the report goes to `out` only. `ttt` as in `evaluate`."""
    checkpoint = Path(checkpoint)
    loaded = load_detector(checkpoint)
    cfg = loaded.config
    eval_cfg = eval_settings(cfg.eval, score_threshold, iou_threshold)
    splits, samples = _split_of(loaded, data, max_images, environ)
    adapted = _ttt_backend(loaded, ttt)
    started = time.perf_counter()
    detections = predict_as_trained(None, loaded, samples, adapted)
    metrics = score(samples, detections, splits.class_names, cfg.model.postprocess.max_det, eval_cfg)
    report = {"source": {"checkpoint": str(checkpoint)}, **_eval_facts(splits, samples, data, started),
              "config_hash": loaded.bundle["config_hash"], "step": loaded.bundle["progress"]["global_step"],
              "metrics": metrics}
    if adapted is not None:
        report["ttt"] = adapted.report.as_dict()
        log.info("%s", adapted.report.summary())
    _write_eval_report(report, None, "checkpoint", out)
    return metrics


def evaluate_onnx(onnx_path: str | Path, *, data: str | Path | None = None, out: str | Path | None = None,
                  max_images: int | None = None, score_threshold: float | None = None,
                  iou_threshold: float | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """COCO metrics and the operating point of an exported ONNX model (ONNX Runtime, CPU).

    Evaluated on `data` (a config, dataset folder or dataset YAML), or, for a model inside a
    run's exports/, on that run's validation split (then also written to the run's
    reports/eval_onnx.json).
    """
    onnx_path = Path(onnx_path)
    backend = OnnxBackend(onnx_path)
    run = _run_of_export(onnx_path)
    run_cfg = load_config(run.config_resolved) if run is not None else None
    if data is not None:
        data_cfg = dataset_config(Path(data), backend.image_size)
        splits = other_data(backend.class_names, data_cfg, cache_dir(environ), Path(data))
    elif run_cfg is not None:
        data_cfg = run_cfg.data.model_copy(update={"image_size": backend.image_size})
        splits = other_data(backend.class_names, data_cfg, cache_dir(environ), run.root)
    else:
        raise DetpactError(f"{onnx_path} is not inside a run's exports/ folder: name the dataset to evaluate it on "
                           "with --data CONFIG_OR_DATASET.")
    eval_cfg = eval_settings(run_cfg.eval if run_cfg else EvalConfig(), score_threshold, iou_threshold)
    samples = first_images(splits.val, max_images)
    started = time.perf_counter()
    detections = predict_loader(backend, eval_loader(samples, data_cfg, eval_cfg.batch_size), progress="eval")
    metrics = score(samples, detections, splits.class_names, backend.post_cfg.max_det, eval_cfg)
    report = {"source": {"onnx": str(onnx_path), "in_graph_postprocessing": backend.in_graph},
              **_eval_facts(splits, samples, data, started), "config_hash": backend.meta.get("config_hash"),
              "metrics": metrics}
    _write_eval_report(report, run if data is None else None, "onnx", out)
    if run is not None and data is None:  # the run keeps the report: the registry records it (never raises)
        record_run_of(run, environ)
    return metrics


def evaluate_predictions(predictions: str | Path, *, gt: str | Path | None = None, run_dir: str | Path | None = None,
                         data: str | Path | None = None, bbox_format: str = "xyxy", out: str | Path | None = None,
                         max_images: int | None = None, score_threshold: float | None = None,
                         iou_threshold: float | None = None, environ: Mapping[str, str] | None = None
                         ) -> dict[str, Any]:
    """COCO metrics of a predictions file (detpact's schema or COCO results JSON) against a
    COCO ground-truth file (`gt`), a run's validation split (`run_dir`) or a dataset's
    (`data`); the report goes to `out` when given."""
    started = time.perf_counter()
    eval_cfg = eval_settings(EvalConfig(), score_threshold, iou_threshold)
    if gt is not None:
        if run_dir is not None or data is not None or max_images is not None:
            raise DetpactError("eval --predictions with --gt takes no run folder, --data or --max-images: the "
                               "ground-truth file is the whole evaluation set.")
        ground_truth = load_json(Path(gt), "a COCO ground-truth file")
        results = coco_results_for(Path(predictions), ground_truth, bbox_format)
        metrics = evaluate_coco_json(ground_truth, results)
        metrics["operating_point"] = operating_point(*_coco_records(ground_truth, results), eval_cfg.score_threshold,
                                                     eval_cfg.iou_threshold)
        facts: dict[str, Any] = {"ground_truth": str(gt), "seconds": round(time.perf_counter() - started, 2),
                                 "time": utc_now()}
    else:
        if (run_dir is None) == (data is None):
            raise DetpactError("eval --predictions FILE needs what to score it against: --gt COCO_JSON, a run folder "
                               "(its validation split) or --data CONFIG_OR_DATASET.")
        splits = _data_for_predictions(run_dir, data, environ)
        samples = first_images(splits.val, max_images)
        detections = predictions_on(Path(predictions), samples, splits.class_names, bbox_format)
        metrics = score(samples, detections, splits.class_names, 100, eval_cfg)
        facts = _eval_facts(splits, samples, data, started)
    _write_eval_report({"source": {"predictions": str(predictions)}, **facts, "metrics": metrics}, None,
                       "predictions", out)
    return metrics


def evaluate_as_trained(run: RunDir, loaded: LoadedModel, samples: list[Sample], class_names: list[str],
                         eval_cfg: EvalConfig) -> dict[str, Any]:
    """Validation metrics of `loaded`, computed as training computed them: same seed,
    determinism and thread count, so the numbers reproduce the logged ones exactly."""
    detections = predict_as_trained(run, loaded, samples)
    return score(samples, detections, class_names, loaded.config.model.postprocess.max_det, eval_cfg)


def predict_as_trained(run: RunDir | None, loaded: LoadedModel, samples: list[Sample],
                       adapted: TTTBackend | None = None) -> list[ImageDetections]:
    """`loaded`'s detections on `samples` (image_id = index), as training's validation
    made them (what engine.evaluate.evaluate does, keeping the detections; with the run's
    thread count when `run`); with `adapted`, that test-time training backend's, in
    batches of its batch size."""
    cfg = loaded.config
    meta = (read_json(run.run_meta) or {}) if run is not None else {}
    threads = (meta.get("determinism") or {}).get("num_threads")
    setup_determinism(cfg.run.seed, cfg.run.deterministic, threads)
    backend = adapted or TorchBackend(loaded.model.eval(), cfg.model.postprocess, loaded.device, cfg.run.amp,
                                      cfg.run.channels_last)
    batch_size = adapted.settings.batch_size if adapted else cfg.eval.batch_size
    return predict_loader(backend, eval_loader(samples, cfg.data, batch_size))


def _split_of(loaded: LoadedModel, data: str | Path | None, max_images: int | None,
              environ: Mapping[str, str] | None) -> tuple[DatasetSplits, list[Sample]]:
    """The dataset a model is evaluated on (its own config's, or `data`'s with the same
    classes) and the images of its validation split that are scored."""
    splits = run_data(loaded, environ) if data is None else other_data(
        loaded.class_names, dataset_config(Path(data), loaded.config.data.image_size), cache_dir(environ), Path(data))
    return splits, first_images(splits.val, max_images)


def _ttt_backend(loaded: LoadedModel, ttt: TTTSettings | None) -> TTTBackend | None:
    """The test-time training backend of `loaded` (None without `ttt`)."""
    if ttt is None:
        return None
    cfg = loaded.config
    plain = TorchBackend(loaded.model.eval(), cfg.model.postprocess, loaded.device, cfg.run.amp, cfg.run.channels_last)
    return ttt_backend(plain, loaded.model, ttt)


def _eval_facts(splits: DatasetSplits, samples: list[Sample], data: str | Path | None, started: float
                ) -> dict[str, Any]:
    """What an evaluation report says about the images it scored."""
    return {"split": "val", "data": str(data) if data is not None else None, "dataset_root": str(splits.root),
            "dataset_fingerprint": splits.fingerprint, "num_images": len(samples),
            "seconds": round(time.perf_counter() - started, 2), "time": utc_now()}


def _write_eval_report(report: dict[str, Any], run: RunDir | None, name: str, out: str | Path | None) -> None:
    """To the run's reports/eval_<name>.json (and its manifest) when `run`, and to `out`."""
    if run is not None:
        atomic_write_json(run.reports / report_name(name), report)
        write_manifest(run)
    if out is not None:
        atomic_write_json(Path(out), report)


def _run_of_export(onnx_path: Path) -> RunDir | None:
    """The run whose exports/ folder holds `onnx_path`, if any."""
    if onnx_path.resolve().parent.name != "exports":
        return None
    run = RunDir(onnx_path.resolve().parent.parent)
    return run if run.config_resolved.is_file() else None


def _data_for_predictions(run_dir: str | Path | None, data: str | Path | None,
                          environ: Mapping[str, str] | None) -> DatasetSplits:
    """The split a predictions file is scored on: a run's, or a dataset's (as YOLO, or a config's)."""
    if run_dir is not None:
        run = open_run(run_dir, environ)
        return build_datasets(load_config(run.config_resolved).data, cache_dir(environ))
    data_cfg = dataset_config(Path(data), 640)  # the size does not matter: no image is loaded
    return build_datasets(data_cfg, cache_dir(environ))


def _coco_records(gt: Mapping[str, Any], results: list[dict[str, Any]]
                  ) -> tuple[list[ImageGT], list[ImageDetections], list[str]]:
    """COCO ground truth and results as per-image records (class = rank of the category id)."""
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}

    def xyxy(rows: list[dict[str, Any]]) -> np.ndarray:
        boxes = np.array([r["bbox"] for r in rows], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes

    anns, dets = defaultdict(list), defaultdict(list)
    for ann in gt.get("annotations", []):
        anns[ann["image_id"]].append(ann)
    for result in results:
        dets[result["image_id"]].append(result)
    gts, detections = [], []
    for image in gt["images"]:
        a, d = anns[image["id"]], dets[image["id"]]
        gts.append(ImageGT(image["id"], image.get("width", 0), image.get("height", 0), xyxy(a),
                           np.array([index[x["category_id"]] for x in a], np.int64),
                           np.array([bool(x.get("iscrowd", 0)) for x in a], bool)))
        detections.append(ImageDetections(image["id"], xyxy(d), np.array([x["score"] for x in d], np.float64),
                                          np.array([index[x["category_id"]] for x in d], np.int64)))
    return gts, detections, [c["name"] for c in categories]


def verify_config_hash(loaded: LoadedModel, config_path: Path) -> None:
    cfg = load_config(config_path)
    if config_hash(cfg) != loaded.bundle["config_hash"]:
        diffs = diff_configs(loaded.bundle["config"], cfg)
        log.warning("config %s does not match the checkpoint's (hash differs): %s", config_path,
                    "; ".join(diffs[:10]) or "no key-level difference")
    else:
        log.info("config %s matches the checkpoint (hash %s)", config_path, loaded.bundle["config_hash"][:12])
