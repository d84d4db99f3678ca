"""Command line: argument parsing only. Every command calls the API; user errors
(DetpactError) become a one-paragraph message and their exit status, with no
traceback unless --debug is given."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detpact import __version__, api
from detpact.commands import doctor as doctor_command
from detpact.commands import lora as lora_command
from detpact.commands import predictions as predictions_command
from detpact.commands import registry as registry_command
from detpact.commands import report as report_command
from detpact.commands import runs_compare, runs_table
from detpact.commands import smoke as smoke_command
from detpact.commands import test as test_command
from detpact.commands.model_info import format_model_info
from detpact.console import setup_logging
from detpact.data.convert import SOURCE_FORMATS, TARGET_FORMATS, convert, format_summary
from detpact.data.preflight import PreflightReport
from detpact.errors import DetpactError, TrainingStopped
from detpact.evaluation.coco import format_table
from detpact.evaluation.operating import format_operating_point
from detpact.inference.predictions import BBOX_FORMATS
from detpact.inference.predictor import TTASettings
from detpact.robustness.ttt import add_ttt_arguments, ttt_settings
from detpact.run.verify import Check

log = logging.getLogger("detpact")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detpact", description="Train, resume, evaluate, export and use detectors.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"detpact {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train (or --resume) a run from a YAML config")
    train.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    train.add_argument("--run-id", help="run folder name under the output root (default: <time>_<run.name>)")
    train.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/last.pt")
    train.add_argument("--allow-drift", action="store_true",
                       help="with --resume: continue even though the config or the data changed (recorded in run_meta.json)")
    train.add_argument("--ddp", action="store_true",
                       help="train with several processes; needs torchrun (torchrun's environment also turns it on)")
    train.add_argument("--allow-world-size-change", action="store_true",
                       help="with --resume: continue with another number of processes than the run was trained with")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=5 (repeatable)")

    evaluate = commands.add_parser(
        "eval", help="COCO mAP and the operating point of a run's checkpoint, an ONNX file or a predictions file")
    evaluate.add_argument("target", nargs="?", metavar="RUN_OR_MODEL",
                          help="run folder (e.g. runs/exp01), exported model (.onnx) or checkpoint file (.pt, e.g. "
                               "from `detpact lora merge`); with --predictions, an optional run whose validation "
                               "split is the ground truth")
    evaluate.add_argument("--predictions", metavar="FILE",
                          help="evaluate this predictions file (detpact's schema or COCO results JSON) against --gt, "
                               "--data or a run's validation split")
    evaluate.add_argument("--gt", metavar="COCO_JSON", help="with --predictions: a COCO ground-truth file")
    evaluate.add_argument("--bbox-format", choices=BBOX_FORMATS, default="xyxy",
                          help="with --predictions: layout of the boxes in a detpact predictions file")
    evaluate.add_argument("--checkpoint", choices=api.CHECKPOINT_CHOICES, default="best")
    evaluate.add_argument("--verify-config", metavar="CONFIG", help="warn if CONFIG does not hash like the checkpoint's")
    evaluate.add_argument("--data", metavar="CONFIG_OR_DATASET",
                          help="evaluate on the validation split of this config's dataset, dataset folder or dataset "
                               "YAML instead (same classes); the run folder is left as it is")
    evaluate.add_argument("--max-images", type=int, metavar="N", help="only the first N images of the split")
    evaluate.add_argument("--score-threshold", type=float, metavar="S",
                          help="operating point: detections scoring >= S count (default: eval.score_threshold, 0.25)")
    evaluate.add_argument("--iou-threshold", type=float, metavar="T",
                          help="operating point: a match needs IoU >= T (default: eval.iou_threshold, 0.5)")
    evaluate.add_argument("--out", metavar="FILE", help="also write the evaluation report (JSON) to FILE")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    add_ttt_arguments(evaluate)  # --ttt, --ttt-preset, ... (robustness/ttt)

    export = commands.add_parser("export", help="export a run's checkpoint to ONNX and check parity")
    export.add_argument("run_dir", help="run folder, e.g. runs/exp01")
    export.add_argument("--checkpoint", choices=api.CHECKPOINT_CHOICES, default="best")
    export.add_argument("--opset", type=int, help="ONNX opset (default: export.opset, 18)")
    export.add_argument("--nms", action=argparse.BooleanOptionalAction, default=None,
                        help="put the postprocessing inside the graph: outputs boxes, scores, labels, num_dets "
                             "(default: export.nms, off)")
    export.add_argument("--half", action="store_true", default=None, help="float16 model; needs CUDA")

    predict = commands.add_parser("predict", help="detect objects in images with a run's checkpoint or an ONNX file")
    predict.add_argument("source", metavar="RUN_OR_MODEL",
                         help="run folder (e.g. runs/exp01), exported .onnx file or checkpoint file (.pt)")
    predict.add_argument("images", nargs="+", help="image files, folders or glob patterns (quote them: 'photos/*.jpg')")
    predict.add_argument("--out", required=True, help="predictions JSON file to write")
    predict.add_argument("--save-images", metavar="DIR", help="also save the images with boxes drawn into DIR")
    predict.add_argument("--backend", choices=api.BACKENDS,
                         help="torch (a run's checkpoint; the default for a run) or onnxruntime (its exported model)")
    predict.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    predict.add_argument("--iou", type=float, help="NMS IoU threshold (default: the model's, model.postprocess)")
    predict.add_argument("--max-det", type=int, help="detections kept per image (default: the model's)")
    predict.add_argument("--batch", type=int, help="images per batch (default: eval.batch_size)")
    predict.add_argument("--checkpoint", choices=api.CHECKPOINT_CHOICES, default="best")
    predict.add_argument("--tta", action="store_true",
                         help="test-time augmentation: predict on flipped and rescaled views and merge them")
    predict.add_argument("--tta-scales", default="1.0,0.83,1.17", metavar="S,S,...",
                         help="with --tta: input scales (default 1.0,0.83,1.17)")
    predict.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=True,
                         help="with --tta: also the horizontally flipped views (default on)")
    predict.add_argument("--tta-merge", choices=("wbf", "nms"), default="wbf",
                         help="with --tta: weighted box fusion (default) or NMS over all views")
    predict.add_argument("--tta-iou", type=float, default=0.55, help="with --tta: IoU that merges boxes (default 0.55)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ttt_arguments(predict)  # --ttt, --ttt-preset, ... (robustness/ttt)

    data = commands.add_parser("data", help="check and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    preflight = data_commands.add_parser(
        "preflight", help="check every image and label of a dataset; exit 1 when it has errors")
    preflight.add_argument("target", metavar="CONFIG_OR_DATASET",
                           help="a detpact config, an Ultralytics dataset YAML, or a YOLO folder (images/<split>/)")
    preflight.add_argument("--output-json", metavar="FILE", help="also write every finding and the counts as JSON")
    preflight.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value (with a config), e.g. --set data.path=/data/x")

    show = data_commands.add_parser("show", help="draw augmented training samples with their boxes into a PNG")
    show.add_argument("config", help="YAML config file")
    show.add_argument("--out", required=True, help="PNG file to write, e.g. grid.png")
    show.add_argument("--count", type=int, default=16, help="how many samples (default 16)")
    show.add_argument("--epoch", type=int, default=0, help="draw the augmentation of this epoch (default 0)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set data.augment.mosaic_p=0")

    convert_cmd = data_commands.add_parser(
        "convert", help="convert a dataset between COCO, Pascal VOC and YOLO into a new folder")
    convert_cmd.add_argument("--from", dest="src_format", choices=SOURCE_FORMATS,
                             help="format of SRC (default: recognised from SRC)")
    convert_cmd.add_argument("--to", dest="dst_format", required=True, choices=TARGET_FORMATS, help="format to write")
    convert_cmd.add_argument("src", metavar="SRC",
                             help="coco: the JSON file; voc: a folder with annotations/ and images/ (or the XML folder, "
                                  "with --images); yolo: a folder with images/, labels/, classes.txt, or a dataset YAML")
    convert_cmd.add_argument("out", metavar="OUT", help="output folder: new or empty, outside SRC")
    convert_cmd.add_argument("--images", metavar="DIR", help="coco/voc: the image folder (default: found next to SRC)")
    convert_cmd.add_argument("--classes", metavar="A,B,...", help="class names in id order, comma-separated")
    convert_cmd.add_argument("--copy-images", action="store_true",
                             help="copy the images into OUT/images (default: symlinks to the originals)")
    convert_cmd.add_argument("--force", action="store_true",
                             help="convert despite error findings (defective boxes and unusable images are left out)")

    model = commands.add_parser("model", help="inspect a configured detector")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    info = model_commands.add_parser(
        "info", help="parameters, GFLOPs, output strides and channels, and CPU forward time of a config's detector")
    info.add_argument("config", help="YAML config file, e.g. configs/rtdetr_quickstart.yaml")
    info.add_argument("--num-classes", type=int, help="class count (default: from the config's dataset)")
    info.add_argument("--image-size", type=int, help="input size (default: data.image_size)")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set model.backbone.name=resnet18")
    info.add_argument("--json", action="store_true", help="print the report as JSON")

    for module in COMMAND_MODULES.values():
        module.add_parser(commands)

    runs = commands.add_parser("runs", help="inspect run folders")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="RUNS_COMMAND")
    verify = runs_commands.add_parser(
        "verify", help="check a run's artifacts, config hash, data and best.pt metric against its records")
    verify.add_argument("run_dir", help="run folder (e.g. runs/exp01) or run id")
    verify.add_argument("--no-eval", action="store_true", help="skip re-evaluating best.pt (the slow check)")
    verify.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    runs_table.add_parsers(runs_commands)  # runs list, runs show
    runs_compare.add_parser(runs_commands)  # runs compare
    return parser


# The verbs whose module parses and runs them itself (add_parser / run).
COMMAND_MODULES = {"predictions": predictions_command, "doctor": doctor_command, "smoke": smoke_command,
                   "registry": registry_command, "report": report_command, "lora": lora_command}
COMMAND_MODULES["test"] = test_command  # the scenario suite (docs/robustness.md)


def run_command(args: argparse.Namespace) -> int:
    if args.command == "train":
        for flag in ("allow_drift", "allow_world_size_change"):
            if getattr(args, flag) and not args.resume:
                raise DetpactError(f"--{flag.replace('_', '-')} only applies to --resume.")
        run = api.train(args.config, run_id=args.run_id, resume=args.resume, allow_drift=args.allow_drift,
                        overrides=args.overrides, ddp=args.ddp, allow_world_size_change=args.allow_world_size_change)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
            print(f"run directory: {run.root}")
    elif args.command == "eval":
        print_metrics(evaluate_command(args), args.json)
    elif args.command == "export":
        report = api.export(args.run_dir, checkpoint=args.checkpoint, opset=args.opset, nms=args.nms, half=args.half)
        print(f"exported {report['onnx']} (parity {report['verdict']})")
    elif args.command == "predict":
        records = api.predict(args.source, args.images, out=args.out, save_images=args.save_images,
                              checkpoint=args.checkpoint, backend=args.backend, score_threshold=args.conf,
                              iou_threshold=args.iou, max_det=args.max_det, batch_size=args.batch,
                              tta=tta_settings(args), progress=not args.no_progress, ttt=ttt_settings(args))
        found = sum(len(r["detections"]) for r in records)
        print(f"{found} detections in {len(records)} images -> {args.out}")
    elif args.command == "data" and args.data_command == "show":
        if args.count < 1:
            raise DetpactError("--count must be at least 1.")
        path = api.show_samples(args.config, out=args.out, count=args.count, epoch=args.epoch,
                                overrides=args.overrides)
        print(f"wrote {path}")
    elif args.command == "data" and args.data_command == "convert":
        summary = convert(args.src_format, args.dst_format, args.src, args.out, copy_images=args.copy_images,
                          images=args.images, classes=args.classes.split(",") if args.classes else None,
                          force=args.force)
        print(format_summary(summary))
    elif args.command == "data":
        report = api.preflight(args.target, output_json=args.output_json, overrides=args.overrides)
        print_preflight(report)
        return 1 if report.errors else 0
    elif args.command == "model":
        if args.num_classes is not None and args.num_classes < 1:
            raise DetpactError("--num-classes must be at least 1.")
        report = api.model_info(args.config, overrides=args.overrides, num_classes=args.num_classes,
                                image_size=args.image_size)
        print(json.dumps(report, indent=2) if args.json else format_model_info(report))
    elif args.command in COMMAND_MODULES:
        return COMMAND_MODULES[args.command].run(args)
    elif args.command == "runs" and args.runs_command in ("list", "show"):
        return runs_table.run(args)
    elif args.command == "runs" and args.runs_command == "compare":
        return runs_compare.run(args)
    elif args.command == "runs":
        checks = api.verify(args.run_dir, reevaluate=not args.no_eval)
        failed = [check for check in checks if check.status == "fail"]
        if args.json:
            print(json.dumps({"passed": not failed, "checks": [asdict(check) for check in checks]}, indent=2))
        else:
            print_checks(checks)
        return 1 if failed else 0
    return 0


def tta_settings(args: argparse.Namespace) -> TTASettings | None:
    if not args.tta:
        return None
    try:
        scales = tuple(float(v) for v in args.tta_scales.split(","))
    except ValueError:
        raise DetpactError(f"--tta-scales takes numbers separated by commas, e.g. 1.0,0.83,1.17; got "
                           f"{args.tta_scales!r}.") from None
    return TTASettings(scales, args.tta_flip, args.tta_merge, args.tta_iou)


def evaluate_command(args: argparse.Namespace) -> dict:
    """`detpact eval`: what to evaluate is the run, the .onnx file or the predictions file named."""
    common = {"out": args.out, "score_threshold": args.score_threshold, "iou_threshold": args.iou_threshold}
    ttt = ttt_settings(args)
    if ttt is not None and (args.predictions or (args.target or "").endswith(".onnx")):
        raise DetpactError("--ttt adapts a run's PyTorch checkpoint: evaluate a run folder with it.")
    if args.predictions:
        run_dir = args.target
        return api.evaluate_predictions(args.predictions, gt=args.gt, run_dir=run_dir, data=args.data,
                                        bbox_format=args.bbox_format, max_images=args.max_images, **common)
    if args.gt:
        raise DetpactError("--gt only applies with --predictions FILE.")
    if not args.target:
        raise DetpactError("eval needs a run folder (e.g. runs/exp01), an exported .onnx file, a checkpoint .pt "
                           "file, or --predictions FILE.")
    if args.target.endswith(".onnx"):
        return api.evaluate_onnx(args.target, data=args.data, max_images=args.max_images, **common)
    if args.target.endswith(".pt"):
        return api.evaluate_checkpoint(args.target, data=args.data, max_images=args.max_images, ttt=ttt, **common)
    return api.evaluate(args.target, checkpoint=args.checkpoint, verify_config=args.verify_config, data=args.data,
                        max_images=args.max_images, ttt=ttt, **common)


def print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    print(format_table(metrics))
    if "operating_point" in metrics:
        print(format_operating_point(metrics["operating_point"]))


def print_checks(checks: list[Check]) -> None:
    table = Table(show_header=True, header_style="bold", box=None)
    for column in ("check", "result", "detail"):
        table.add_column(column)
    styles = {"pass": "green", "warn": "yellow", "fail": "bold red"}
    for check in checks:
        table.add_row(escape(check.name), f"[{styles[check.status]}]{check.status.upper()}[/]", escape(check.detail))
    failed = [check.name for check in checks if check.status == "fail"]
    out = Console(width=max(120, Console().width))
    out.print(table)
    out.print(f"verify: [bold red]FAIL[/] ({len(failed)} of {len(checks)} checks failed: {escape(', '.join(failed))})"
              if failed else f"verify: [green]PASS[/] ({len(checks)} checks)")


def print_preflight(report: PreflightReport, limit: int = 50) -> None:
    out = Console(width=max(120, Console().width))
    splits = Table(title=f"preflight: {escape(str(report.root))} ({report.format}, {len(report.class_names)} classes)",
                   header_style="bold", box=None, title_justify="left")
    columns = ("images", "boxes", "ignored_boxes", "backgrounds", "exif_rotated")
    for column in ("split", *columns):
        splits.add_column(column, justify="left" if column == "split" else "right")
    for name, stats in report.splits.items():
        splits.add_row(escape(name), *(str(getattr(stats, c)) for c in columns))
    out.print(splits)
    if report.findings:
        findings = Table(header_style="bold", box=None)
        for column in ("severity", "kind", "file", "where", "message"):
            findings.add_column(column, overflow="fold")
        styles = {"error": "bold red", "warning": "yellow"}
        for f in report.findings[:limit]:
            findings.add_row(f"[{styles[f.severity]}]{f.severity}[/]", f.kind, escape(report.relative(f.path)),
                             escape(f.where or ""), escape(f.message))
        out.print(findings)
        if len(report.findings) > limit:
            out.print(f"... and {len(report.findings) - limit} more findings (all of them: --output-json FILE)")
    verdict = "[bold red]FAIL[/]" if report.errors else "[green]PASS[/]"
    out.print(f"preflight: {verdict} ({escape(report.summary())})")


def resume_command(args: argparse.Namespace, run_id: str) -> str:
    """The command line that continues a stopped `train` command."""
    world_size = os.environ.get("WORLD_SIZE")
    launcher = ["torchrun", f"--nproc_per_node={world_size}", "-m", "detpact"] if world_size else ["detpact"]
    words = [*launcher, "train", args.config, "--run-id", run_id, "--resume"]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        return run_command(args)
    except TrainingStopped as exc:
        if args.debug:
            raise
        print(f"stopped: {exc.message}\nResume with:\n  {resume_command(args, exc.run_id)}", file=sys.stderr)
        return exc.exit_code
    except DetpactError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout was piped into a reader that exited (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
