"""The typed run config: schema, YAML loading, `--set` overrides and the config hash.

A config is loaded once, at the edge (CLI or API entry), validated against the
schema and then passed down narrowly: builders receive the sub-config they need
(`build_model(cfg.model, ...)`), never the whole tree.

    section.py  the base of every section (unknown keys are errors)
    run.py, data.py, model.py, train.py, outputs.py   one schema module per section
    tree.py     the root `Config`
    load.py     YAML + overrides -> Config, readable errors, hash, diff
"""

from detpact.config.data import AugmentConfig, DataConfig, SplitSource, SyntheticConfig
from detpact.config.load import (
    HASH_EXCLUDED_KEYS,
    config_hash,
    diff_configs,
    dump_config_yaml,
    is_config_file,
    load_config,
    load_config_or_dataset,
    resolved_dict,
    validate_config,
)
from detpact.config.model import (
    AssignerConfig,
    BackboneConfig,
    CSPDarknetArgs,
    HeadConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    NeckConfig,
    PostprocessConfig,
    ProjectorConfig,
    RTDETRConfig,
    SetLossConfig,
)
from detpact.config.outputs import EvalConfig, ExportConfig, LoggingConfig
from detpact.config.run import RunConfig
from detpact.config.train import (
    BNRecalibrationConfig,
    CheckpointConfig,
    EarlyStopConfig,
    EMAConfig,
    NonFiniteConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)
from detpact.config.tree import CONFIG_VERSION, Config

__all__ = [
    "CONFIG_VERSION", "HASH_EXCLUDED_KEYS", "AssignerConfig", "AugmentConfig", "BackboneConfig", "BNRecalibrationConfig",
    "CSPDarknetArgs",
    "CheckpointConfig", "Config", "EarlyStopConfig", "DataConfig", "EMAConfig", "EvalConfig", "ExportConfig", "HeadConfig",
    "LoggingConfig", "LossConfig", "MatcherConfig", "ModelConfig", "NeckConfig", "NonFiniteConfig", "OptimizerConfig",
    "PostprocessConfig", "ProjectorConfig", "RTDETRConfig", "RunConfig", "SetLossConfig", "SchedulerConfig", "SplitSource", "SyntheticConfig", "TrainConfig",
    "config_hash", "diff_configs", "dump_config_yaml", "is_config_file", "load_config", "load_config_or_dataset", "resolved_dict", "validate_config",
]
