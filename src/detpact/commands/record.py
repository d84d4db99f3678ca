"""Recording runs in the model registry after training, evaluation and export.

Where the registry is (the entry layer reads the environment here, once):

- training: `--set registry.path=...` > $DETPACT_REGISTRY > the config's `registry.path`
  > registry.db in the runs root. An explicit path is resolved into the run's config (so
  config_resolved.yaml says where the run is registered) as an absolute path.
- an evaluation or export of a run: the registry it was trained into (its resolved
  `registry.path`) > $DETPACT_REGISTRY > registry.db beside the run folder (its runs root).
- `detpact registry ...`: `--registry PATH` > $DETPACT_REGISTRY > registry.db in the runs
  root ($DETPACT_OUTPUT_DIR, else runs).

Recording never fails the command that records (run/registry_index.record_run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from detpact.config import Config
from detpact.run.contract import RunDir, resolve_output_root
from detpact.run.registry_index import record_run, resolved_config

REGISTRY_ENV = "DETPACT_REGISTRY"
DEFAULT_NAME = "registry.db"


def registry_from_environment(cfg: Config, environ: Mapping[str, str], overrides: Sequence[str]) -> Config:
    """`cfg` with `registry.path` from $DETPACT_REGISTRY when set (a --set registry.path=...
    still wins: CLI > environment > file), made absolute. None (the default) stays None:
    registry.db in the runs root that holds the run."""
    on_command_line = any(o.partition("=")[0].strip() == "registry.path" for o in overrides)
    path = cfg.registry.path if on_command_line else environ.get(REGISTRY_ENV) or cfg.registry.path
    if not path:
        return cfg
    absolute = str(Path(path).expanduser().absolute())
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"path": absolute})})


def record_training(run: RunDir, cfg: Config) -> None:
    """Record a finished, stopped or failed training (rank 0; `cfg` from registry_from_environment)."""
    record_run(run, Path(cfg.registry.path) if cfg.registry.path else run.root.parent / DEFAULT_NAME)


def record_run_of(run: RunDir, environ: Mapping[str, str] | None) -> None:
    """Record a run again after an evaluation or export of it."""
    record_run(run, registry_of_run(run, os.environ if environ is None else environ))


def registry_of_run(run: RunDir, environ: Mapping[str, str]) -> Path:
    section = resolved_config(run).get("registry")
    configured = section.get("path") if isinstance(section, dict) else None
    return Path(configured or environ.get(REGISTRY_ENV) or run.root.parent / DEFAULT_NAME)


def registry_for_command(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    """The registry a `detpact registry` command works on."""
    return Path(cli_path or environ.get(REGISTRY_ENV) or resolve_output_root(None, environ) / DEFAULT_NAME)
