"""The typed run config: schema, YAML loading, `--set` overrides and the config hash.

A config is loaded once, at the edge (CLI or API entry), validated against the
schema below and then passed down narrowly: builders receive the sub-config they
need (`build_model(cfg.model, ...)`), never the whole tree.

Priority is CLI `--set` > YAML file > schema defaults. Unknown keys at any depth
are rejected with the valid keys named; wrong types name the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from detpact.errors import DetpactError

CONFIG_VERSION = 1

# Keys that do not change what a run computes (the thread count only its last bits):
# they are left out of the config hash, so e.g. renaming a run, moving its output
# folder or resuming on another machine does not block `--resume`.
HASH_EXCLUDED_KEYS = (
    ("run", "name"),
    ("run", "output_root"),
    ("run", "num_threads"),
    ("task",),
    ("data", "num_workers"),
    ("data", "cache"),
    ("logging",),
)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- run ----------------------------------------------------------------------------


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision for forward/backward. bf16 works on CPU and recent GPUs;
    # fp16 is CUDA-only and uses a gradient scaler.
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    deterministic: bool = True
    # Intra-op CPU threads; None = torch's default for the machine. Always fixed and
    # recorded (CPU bits depend on it); a resume reuses the checkpoint's count unless set.
    num_threads: int | None = Field(None, ge=1)
    output_root: str | None = None


# --- data ---------------------------------------------------------------------------


class SyntheticConfig(Section):
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(200, ge=1)
    image_size: int = Field(256, ge=32)
    max_objects: int = Field(8, ge=1)
    seed: int = 0


class SplitSource(Section):
    """Where one split's files are, relative to `data.path`. A plain string is `images`."""

    # Folder of images (yolo: also a .txt file listing image paths, one per line).
    images: str
    # yolo only: the label folder. Default: `images` with its last `images` path
    # component swapped for `labels` (the Ultralytics convention).
    labels: str | None = None
    # coco: the annotation JSON file; voc: the folder of XML files.
    annotations: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"images": value} if isinstance(value, str) else value


class AugmentConfig(Section):
    """Training-time augmentation; every random choice is seeded by (run.seed, epoch, index)."""

    # Probability that a training sample is a 2x2 mosaic of itself and 3 other samples.
    mosaic_p: float = Field(1.0, ge=0.0, le=1.0)
    # Random zoom in [1 - scale, 1 + scale] and shift of up to `translate` x image size.
    scale: float = Field(0.5, ge=0.0, lt=1.0)
    translate: float = Field(0.1, ge=0.0, le=0.5)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    # HSV jitter: hue shift as a fraction of the hue circle, saturation/value gains (0 = off).
    hsv_h: float = Field(0.015, ge=0.0, le=0.5)
    hsv_s: float = Field(0.7, ge=0.0, le=1.0)
    hsv_v: float = Field(0.4, ge=0.0, le=1.0)
    # A box cut by a transform is kept when at least this fraction of its area remains
    # and both sides are at least `min_box_size` pixels on the training canvas.
    min_visibility: float = Field(0.25, ge=0.0, le=1.0)
    min_box_size: float = Field(2.0, ge=0.0)


class DataConfig(Section):
    # yolo: images/ + labels/ txt folders, or `path` naming an Ultralytics dataset YAML.
    # coco: a COCO JSON per split; voc: a folder of Pascal VOC XML per split.
    # synthetic: the built-in shapes dataset, generated into `path` (default: a cache
    # folder). Only chosen when named here: a missing real dataset is always an error.
    format: Literal["yolo", "coco", "voc", "synthetic"] = "yolo"
    path: str | None = None
    classes: list[str] | None = None
    # Split sources, relative to `path`. yolo default: images/train and images/val.
    train: SplitSource | None = None
    val: SplitSource | None = None
    # Without a `val` source: hold out this fraction of `train` (seeded by split_seed,
    # optionally stratified by box-count bucket 0 / 1 / 2+).
    val_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    split_seed: int = 0
    stratify: bool = False
    # A JSON file recording which images went to which split: written on first use,
    # reused (and checked) afterwards. Relative to the current directory, like data.path.
    split_manifest: str | None = None
    # Preflight findings that are errors: `fail` stops before training with the report;
    # `skip` drops the affected images and records them in reports/train_report.json.
    on_error: Literal["fail", "skip"] = "fail"
    image_size: int = Field(640, ge=32)
    augment: AugmentConfig = AugmentConfig()
    # Decoded-image cache: none, ram (per worker process), or disk (.npy files in the
    # cache folder, shared by workers and runs).
    cache: Literal["none", "ram", "disk"] = "none"
    # DataLoader worker processes; "auto" = 0 on machines with <= 2 cores (a worker
    # would compete with the training threads), else half the cores, at most 8.
    num_workers: int | Literal["auto"] = "auto"
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("num_workers")
    @classmethod
    def _non_negative_workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (the largest stride), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent_sources(self) -> DataConfig:
        if self.format != "synthetic" and not self.path:
            raise ValueError(
                f"data.path is required for data.format '{self.format}' "
                "(the dataset folder, or for yolo an Ultralytics dataset YAML)"
            )
        if self.val is not None and self.val_ratio is not None:
            raise ValueError("set either data.val (a validation source) or data.val_ratio (hold out part of train)")
        if self.format in ("coco", "voc"):
            for name, source in (("train", self.train), ("val", self.val)):
                if source is not None and source.annotations is None:
                    raise ValueError(f"data.{name}.annotations is required for format '{self.format}' "
                                     f"({'the JSON file' if self.format == 'coco' else 'the XML folder'})")
            if self.train is None:
                raise ValueError(f"data.train is required for format '{self.format}' "
                                 "(images: and annotations: relative to data.path)")
        return self


# --- model --------------------------------------------------------------------------


class CSPDarknetArgs(Section):
    width_mult: float = Field(0.25, gt=0.0)
    depth_mult: float = Field(0.33, gt=0.0)


class BackboneConfig(Section):
    name: Literal["cspdarknet"] = "cspdarknet"
    args: CSPDarknetArgs = CSPDarknetArgs()


class NeckConfig(Section):
    name: Literal["pan"] = "pan"


class AssignerConfig(Section):
    # FCOS-style assignment: a location is positive for a box when it lies within
    # `center_radius * stride` of the box centre (and inside the box), and the box's
    # size suits the level (max regression distance within that level's range).
    center_radius: float = Field(1.5, gt=0.0)
    # Upper bound of each level's range of max(l, t, r, b), in units of the level's
    # stride; the last level is unbounded. [8, 8] means P3: (0, 64], P4: (64, 128].
    range_strides: list[float] = [8.0, 8.0]


class LossConfig(Section):
    cls_weight: float = Field(1.0, ge=0.0)
    box_weight: float = Field(2.0, ge=0.0)
    # Focal modulation on the IoU-quality classification target (0 = plain BCE).
    quality_gamma: float = Field(2.0, ge=0.0)


class HeadConfig(Section):
    name: Literal["dense"] = "dense"
    assigner: AssignerConfig = AssignerConfig()
    loss: LossConfig = LossConfig()


class PostprocessConfig(Section):
    score_threshold: float = Field(0.001, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.6, gt=0.0, le=1.0)
    max_det: int = Field(100, ge=1)
    pre_nms_topk: int = Field(1000, ge=1)


class ModelConfig(Section):
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    head: HeadConfig = HeadConfig()
    postprocess: PostprocessConfig = PostprocessConfig()


# --- train --------------------------------------------------------------------------


class OptimizerConfig(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)


class SchedulerConfig(Section):
    name: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(200, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)


class EMAConfig(Section):
    enabled: bool = True
    decay: float = Field(0.9998, gt=0.0, lt=1.0)
    # The effective decay ramps up as decay * (1 - exp(-updates / warmup_steps)),
    # so a short run's EMA tracks the model instead of lagging behind its init.
    warmup_steps: int = Field(2000, ge=1)


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1)
    every_epochs: int | None = Field(1, ge=1)


class NonFiniteConfig(Section):
    # A step whose loss or gradients are not finite is skipped; this many in a row
    # abort the run (its last good checkpoint stays in place).
    max_consecutive: int = Field(5, ge=1)


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    # Optimizer steps; the run ends at whichever of epochs / max_steps comes first.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    accumulate: int = Field(1, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    grad_clip: float | None = Field(10.0, gt=0.0)
    ema: EMAConfig = EMAConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    nonfinite: NonFiniteConfig = NonFiniteConfig()


# --- eval / export / logging --------------------------------------------------------


class EvalConfig(Section):
    every_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)


class ExportConfig(Section):
    onnx: bool = True
    # dynamo: torch.export-based exporter (PyTorch's supported path, ~10 s);
    # torchscript: the legacy tracer (deprecated upstream, under a second).
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int = Field(18, ge=13)
    parity_policy: Literal["fail", "warn"] = "fail"
    parity_images: int = Field(8, ge=1)
    # Raw outputs pass when |onnxruntime - torch| <= atol + rtol * |torch| everywhere
    # (box coordinates: rtol relative to max(|torch|, image size); see export/parity.py).
    parity_rtol: float = Field(1e-3, gt=0.0)
    parity_atol: float = Field(1e-5, gt=0.0)


class LoggingConfig(Section):
    progress: bool = True
    status_every_s: float = Field(2.0, gt=0.0)


class Config(Section):
    config_version: int
    run: RunConfig = RunConfig()
    # A free-form label grouping comparable runs (e.g. "shapes", "coco128").
    task: str = "detection"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("config_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"unsupported config_version {v}; this detpact reads version {CONFIG_VERSION}")
        return v


# --- loading ------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `--set key.path=value` overrides and validate it."""
    path = Path(path)
    raw = _read_yaml(path)
    for override in overrides:
        _apply_override(raw, override)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a raw mapping against the schema; errors become one DetpactError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe_error(err, raw) for err in exc.errors()]
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DetpactError(
            f"Invalid config {source}:\n{listing}\n"
            "Fix the key in the YAML file (or the --set override) and run again."
        ) from None


def resolved_dict(config: Config) -> dict[str, Any]:
    """The fully resolved config as plain JSON-compatible data."""
    return config.model_dump(mode="json")


def config_hash(config: Config | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the resolved config, minus result-neutral keys."""
    canonical = json.dumps(_hashed_view(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hashed_view(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The resolved config as plain data without HASH_EXCLUDED_KEYS: what the hash covers."""
    data = resolved_dict(config) if isinstance(config, Config) else json.loads(json.dumps(config))
    for key_path in HASH_EXCLUDED_KEYS:
        node = data
        for key in key_path[:-1]:
            node = node.get(key, {})
        node.pop(key_path[-1], None)
    return data


def dump_config_yaml(config: Config) -> str:
    """YAML text of the resolved config; loading it back gives the same hash."""
    header = "# Fully resolved detpact config (defaults filled, overrides applied).\n"
    return header + yaml.safe_dump(resolved_dict(config), sort_keys=False)


def diff_configs(old: Config | dict[str, Any], new: Config | dict[str, Any]) -> list[str]:
    """`key.path: old -> new` for every hashed key that differs: why two configs hash apart."""
    return _diff_dicts(_hashed_view(old), _hashed_view(new), prefix="")


def _diff_dicts(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_diff_dicts(a, b, prefix=f"{path}."))
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DetpactError(
            f"Config file not found: {path}. Pass the path of a YAML config "
            "(see configs/quickstart.yaml for a complete example)."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DetpactError(f"Config file {path} is not valid YAML: {exc}. Fix the syntax and run again.") from None
    except UnicodeDecodeError:
        raise DetpactError(f"Config file {path} is not UTF-8 text. Save it as UTF-8 YAML.") from None
    if not isinstance(data, dict):
        raise DetpactError(
            f"Config file {path} must hold a YAML mapping (key: value lines), "
            f"not {type(data).__name__}. Start from configs/quickstart.yaml."
        )
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the raw mapping; the value is parsed as YAML (1e-3 -> float)."""
    key, sep, text = override.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise DetpactError(
            f"Bad --set override {override!r}: use --set section.key=value, e.g. --set train.epochs=5."
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in keys[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DetpactError(f"Bad --set override {override!r}: '{part}' is a value, not a section.")
        node = child
    node[keys[-1]] = value


def _describe_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        parent = ".".join(loc[:-1])
        valid = _section_fields(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], valid, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        where = f"in '{parent}'" if parent else "at the top level"
        return f"unknown key '{dotted}'.{did_you_mean} Valid keys {where}: {', '.join(valid)}."
    if err["type"] == "missing":
        return f"'{dotted}' is required but missing."
    got = _lookup(raw, err["loc"])
    return f"'{dotted}': {err['msg']} (got {got!r})."


def _section_fields(loc: list[str]) -> list[str]:
    """Field names of the schema section at `loc` (e.g. ['train', 'optimizer'])."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        # `Section | None` fields: the section is the union's model member
        candidates = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node
