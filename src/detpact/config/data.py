"""`data:` dataset format and location, splits, augmentation, cache, loader workers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from detpact.config.section import Section


class SyntheticConfig(Section):
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(200, ge=1)
    image_size: int = Field(256, ge=32)
    max_objects: int = Field(8, ge=1)
    seed: int = 0
    # Imaging condition (data/domains.py): plain (the original scenes), cluttered
    # (unlabelled distractor shapes on the background) or night (dim, blue-cast, noisy).
    domain: Literal["plain", "cluttered", "night"] = "plain"


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
    # Train the last N epochs without mosaic (other augmentations stay), so that the model
    # ends on whole images as evaluation shows them (YOLOv8's close_mosaic). 0 = never.
    close_mosaic_epochs: int = Field(15, ge=0)


class DataConfig(Section):
    # auto: recognise the dataset at `path` (a YOLO folder, an Ultralytics dataset YAML, a
    # VOC folder, a COCO JSON or a folder holding one; data/detect.py) and its splits; a
    # folder without a validation split holds out val_ratio 0.2 (stratified).
    # yolo: images/ + labels/ txt folders, or `path` naming an Ultralytics dataset YAML.
    # coco: a COCO JSON per split; voc: a folder of Pascal VOC XML per split.
    # synthetic: the built-in shapes dataset, generated into `path` (default: a cache
    # folder). Only chosen when named here: a missing real dataset is always an error.
    format: Literal["auto", "yolo", "coco", "voc", "synthetic"] = "auto"
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
    # Multi-scale training: each optimizer step trains at a size drawn from
    # [image_size * (1 - f), image_size * (1 + f)] (a multiple of 32). 0 = off.
    multi_scale: float = Field(0.0, ge=0.0, lt=1.0)
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
