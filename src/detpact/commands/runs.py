"""What every verb on a run needs: the run folder, its checkpoint, its data, the cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from detpact.data.build import DatasetSplits, build_datasets
from detpact.errors import DetpactError
from detpact.inference.predictor import LoadedModel
from detpact.run.contract import RunDir, resolve_cache_dir, resolve_output_root

log = logging.getLogger(__name__)

CHECKPOINT_CHOICES = ("best", "last")


def cache_dir(environ: Mapping[str, str] | None) -> Path:
    return resolve_cache_dir(os.environ if environ is None else environ)


def checkpoint_path(run: RunDir, which: str) -> Path:
    if which not in CHECKPOINT_CHOICES:
        raise DetpactError(f"Unknown checkpoint {which!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}.")
    path = run.best_ckpt if which == "best" else run.last_ckpt
    if not path.is_file():
        raise DetpactError(f"No {which} checkpoint in {run.root} ({path} is missing): the run has not "
                           "validated or checkpointed yet. Train it (or resume it) first.")
    return path


def open_run(run_dir: str | Path, environ: Mapping[str, str] | None) -> RunDir:
    environ = os.environ if environ is None else environ
    return RunDir.existing(run_dir, resolve_output_root(None, environ))


def run_data(loaded: LoadedModel, environ: Mapping[str, str] | None) -> DatasetSplits:
    data = build_datasets(loaded.config.data, cache_dir(environ))
    if data.fingerprint != loaded.bundle["dataset_fingerprint"]:
        log.warning("the dataset at %s changed since training (fingerprint differs): results may not be "
                    "comparable with the run's own numbers", data.root)
    return data
