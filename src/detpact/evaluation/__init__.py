"""Evaluation: COCO box mAP (computed by faster-coco-eval, pinned to pycocotools)."""

from detpact.evaluation.coco import (
    ImageDetections,
    ImageGT,
    evaluate_coco_json,
    evaluate_detections,
    format_table,
)

__all__ = ["ImageDetections", "ImageGT", "evaluate_coco_json", "evaluate_detections", "format_table"]
