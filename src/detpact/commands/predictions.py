"""`detpact predictions validate|convert`: check a predictions file, and convert between
detpact's schema and COCO results JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detpact.errors import DetpactError
from detpact.inference.predictions import (
    BBOX_FORMATS,
    coco_results_against,
    from_coco_results,
    load_json,
    read_predictions,
    write_predictions,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    predictions = commands.add_parser("predictions", help="check or convert a predictions file")
    sub = predictions.add_subparsers(dest="predictions_command", required=True, metavar="PREDICTIONS_COMMAND")
    validate = sub.add_parser("validate", help="check every entry of a predictions file; exit 2 on the first problems")
    validate.add_argument("file", help="predictions JSON (detpact's schema, the wrapped form or a bare list)")
    validate.add_argument("--bbox-format", choices=BBOX_FORMATS, default="xyxy",
                          help="layout of the boxes in the file (default xyxy pixels)")
    convert = sub.add_parser("convert", help="detpact predictions <-> COCO results JSON")
    convert.add_argument("file", help="the predictions file (--to coco) or COCO results JSON (--to detpact)")
    convert.add_argument("--to", dest="target", choices=("coco", "detpact"), required=True)
    convert.add_argument("--gt", required=True, metavar="COCO_JSON",
                         help="the COCO ground truth: image ids, sizes and file names, and category ids")
    convert.add_argument("--out", required=True, help="the JSON file to write")
    convert.add_argument("--bbox-format", choices=BBOX_FORMATS, default="xyxy",
                         help="--to coco: layout of the boxes in FILE (default xyxy pixels)")


def run(args: argparse.Namespace) -> int:
    if args.predictions_command == "validate":
        images, _ = read_predictions(Path(args.file), args.bbox_format)
        print(f"valid: {len(images)} images, {sum(len(i.detections) for i in images)} detections")
        return 0
    gt = load_json(Path(args.gt), "a COCO ground-truth file")
    out = Path(args.out)
    if args.target == "coco":
        results = coco_results_against(read_predictions(Path(args.file), args.bbox_format)[0], gt)
        out.write_text(json.dumps(results) + "\n", encoding="utf-8")
        print(f"{len(results)} detections -> {out}")
    else:
        results = load_json(Path(args.file), "COCO results JSON")
        if not isinstance(results, list):
            raise DetpactError(f"{args.file}: COCO results JSON is a list of detections.")
        entries = from_coco_results(results, gt)
        write_predictions(out, entries, {"source": str(args.file), "ground_truth": str(args.gt)})
        print(f"{len(results)} detections in {len(entries)} images -> {out}")
    return 0

