"""The whole config tree: every section under one validated root."""

from __future__ import annotations

from pydantic import field_validator, model_validator

from detpact.config.data import DataConfig
from detpact.config.model import ModelConfig
from detpact.config.outputs import EvalConfig, ExportConfig, LoggingConfig
from detpact.config.registry import RegistryConfig
from detpact.config.run import RunConfig
from detpact.config.section import Section
from detpact.config.train import TrainConfig

CONFIG_VERSION = 1


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
    registry: RegistryConfig = RegistryConfig()

    @field_validator("config_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"unsupported config_version {v}; this detpact reads version {CONFIG_VERSION}")
        return v

    @model_validator(mode="after")
    def _queries_fit_the_smallest_input(self) -> Config:
        """The rtdetr head selects its queries among the positions of P3-P5: the smallest
        image a run trains on (multi-scale included) must have at least that many."""
        rtdetr = self.model.head.rtdetr
        if self.model.head.name != "rtdetr":
            return self
        smallest = max(32, int(self.data.image_size * (1 - (self.data.multi_scale or 0.0))) // 32 * 32)
        positions = sum((smallest // stride) ** 2 for stride in (8, 16, 32))
        if rtdetr.num_queries > positions:
            raise ValueError(f"model.head.rtdetr.num_queries ({rtdetr.num_queries}) exceeds the {positions} "
                             f"positions of a {smallest} px input (the smallest this config trains on): lower "
                             "num_queries or raise data.image_size")
        return self

    @model_validator(mode="after")
    def _exporter_fits_the_head(self) -> Config:
        if self.model.head.name == "rtdetr" and self.export.exporter == "torchscript":
            raise ValueError("export.exporter: torchscript cannot export the rtdetr head (the legacy tracer bakes "
                             "the batch size into its attention layers): use export.exporter: dynamo")
        return self
