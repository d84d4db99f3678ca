"""Shared fixtures: a tiny config (synthetic data, 64 px, a few steps) and a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# The shared datasets (coco128, raccoon, COCO eval fixtures) sit next to the checkout
# (../shared/datasets); a clone elsewhere finds them at the workspace's fixed path.
SHARED_DATASETS = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "datasets",
                                    Path("/work/shared/datasets")) if p.is_dir()), Path("/work/shared/datasets"))

TINY_CONFIG = {
    "config_version": 1,
    "run": {"name": "tiny", "seed": 0, "amp": "bf16", "channels_last": True},
    "task": "shapes",
    "data": {
        "format": "synthetic",
        "image_size": 64,
        "num_workers": 0,
        "synthetic": {"num_train": 24, "num_val": 6, "image_size": 64, "max_objects": 3},
        # Every augmentation on (the defaults, spelled out so that a change of defaults
        # cannot quietly take them out of the resume-to-the-same-bits tests).
        "augment": {"mosaic_p": 1.0, "scale": 0.5, "translate": 0.1, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4,
                    "hflip_p": 0.5, "close_mosaic_epochs": 1},
    },
    "model": {"backbone": {"args": {"width_mult": 0.0625, "depth_mult": 0.33}}},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "nominal_batch": None,  # a step per batch: 3 steps per epoch (the resume tests set their own)
        "scheduler": {"warmup_steps": 2},
        "ema": {"decay": 0.9, "warmup_steps": 5},
    },
    "eval": {"batch_size": 8},
    "export": {"onnx": False, "parity_images": 3},
    # The report (plots, report.html: a second evaluation of best.pt and ~4 s a run) is left
    # out of the many tiny runs; tests/integration/test_report_html.py turns it on.
    "logging": {"progress": False, "reports": False},
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-data cache for the whole session (generated once, reused)."""
    return tmp_path_factory.mktemp("cache")


def make_env(output_dir: Path, cache_dir: Path) -> dict[str, str]:
    """Environment for detpact subprocesses: private output folder, shared data cache."""
    return {
        **os.environ,
        "DETPACT_OUTPUT_DIR": str(output_dir),
        "DETPACT_CACHE_DIR": str(cache_dir),
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "250",  # rich wraps log lines at the terminal width; keep each on one line
    }


def write_tiny_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump(TINY_CONFIG, sort_keys=False))
    return path


@pytest.fixture
def env(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    return make_env(tmp_path / "runs", cache_dir)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path / "tiny.yaml")


def train_tiny_run(root: Path, cache_dir: Path, *sets: str) -> tuple[dict[str, str], Path, Path]:
    """Train the tiny config through the CLI into root/runs/tiny (`sets`: extra --set
    arguments); returns the environment, the run folder and its validation image folder."""
    env = make_env(root / "runs", cache_dir)
    config = write_tiny_config(root / "tiny.yaml")
    result = run_cli(["train", str(config), "--run-id", "tiny", *sets], env, root)
    assert result.returncode == 0, result.stderr
    run = root / "runs" / "tiny"
    meta = json.loads((run / "reports" / "run_meta.json").read_text())
    return env, run, Path(meta["dataset"]["root"]) / "images" / "val"


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m detpact ARGS` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "detpact", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# Comparing two runs bit for bit (the resume tests).
TIMING_FIELDS = {"time_s", "samples_per_s"}


def state_digests(checkpoint: Path) -> dict[str, str]:
    """sha256 of every model, EMA and optimizer tensor (and plain value) in a checkpoint."""
    bundle = torch.load(checkpoint, weights_only=True)
    digests: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            raw = f"{value.dtype}{tuple(value.shape)}".encode() + value.numpy().tobytes()
            digests[prefix] = hashlib.sha256(raw).hexdigest()
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        else:
            digests[prefix] = repr(value)

    for key in ("model", "ema", "optimizer"):
        walk(key, bundle[key])
    return digests


def metric_lines(run: Path, name: str) -> list[dict]:
    lines = (run / "reports" / name).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = state_digests(run / "checkpoints" / "last.pt"), state_digests(reference / "checkpoints" / "last.pt")
    assert len(ours) > 100 and ours.keys() == theirs.keys()
    assert [name for name in ours if ours[name] != theirs[name]] == []
    for name in ("train_metrics.jsonl", "val_metrics.jsonl"):
        assert metric_lines(run, name) == metric_lines(reference, name), name


# The heaviest test files, in worker seconds (make test PYTEST_ARGS=--durations=60).
# `make test` hands whole files to two pytest-xdist workers in collection order, so the
# last file to start sets when the suite ends: the long ones start first (test_zoo_pairs,
# alphabetically last, used to run alone at the end).
HEAVY_FIRST = ("unit/test_zoo_pairs.py", "integration/test_resume.py", "integration/test_cli.py",
               "integration/test_eval_export.py", "integration/test_ddp.py", "integration/test_rtdetr_run.py",
               "integration/test_dataset_folders.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def heaviness(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(tests_dir).as_posix(), len(HEAVY_FIRST))

    items.sort(key=heaviness)  # stable: the other files, and the tests in a file, keep their order
