"""Exact resume (issue 3): runs killed, stopped or damaged at different moments and
resumed end bit for bit where an uninterrupted run ends; fresh runs are identical;
the DataLoader worker count changes nothing. Real subprocesses and real signals.

Every run here trains the tiny config (24 images) with batch 3 and a nominal batch of 9:
optimizer steps of 3, 3 and 2 batches per epoch (every batch is used, so an epoch's last
step is short), 6 in all, and a checkpoint every 2 steps, so checkpoints land at steps
2, 3 (epoch end, with best.pt), 4 and 6. The tiny config's mosaic closes for the last
epoch, so the resumed runs also cross that switch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_run, make_env, metric_lines, run_cli, write_tiny_config
from detpact import api
from detpact.run.checkpoint import save_checkpoint
from detpact.run.contract import RunDir, write_manifest

# Steps of 3 batches (the epoch's last of 2), every step at its own size (multi-scale 32 to
# 96 px), mosaic closed for the second epoch, BatchNorm statistics recalibrated on the
# epoch's augmented images before each validation: a resume must repeat all of it.
SETS = ["--set", "train.batch_size=3", "--set", "train.nominal_batch=9", "--set", "train.checkpoint.every_steps=2",
        "--set", "data.multi_scale=0.5", "--set", "train.recalibrate_bn.enabled=true",
        "--set", "train.recalibrate_bn.transform=train"]

pytestmark = pytest.mark.slow


class Runner:
    """Runs `detpact train` on the tiny config in one folder."""

    def __init__(self, root: Path, cache_dir: Path):
        self.root = root
        self.env = make_env(root / "runs", cache_dir)
        self.config = write_tiny_config(root / "tiny.yaml")

    def train(self, run_id: str, *extra: str, fault: str | None = None):
        env = {**self.env, "DETPACT_FAULT": fault} if fault else self.env
        return run_cli(["train", str(self.config), "--run-id", run_id, *SETS, *extra], env, self.root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id


@pytest.fixture(scope="module")
def runner(tmp_path_factory, cache_dir) -> Runner:
    return Runner(tmp_path_factory.mktemp("resume"), cache_dir)


@pytest.fixture(scope="module")
def reference(runner) -> Path:
    """The uninterrupted run every other run is compared with."""
    result = runner.train("straight")
    assert result.returncode == 0, result.stderr
    return runner.run_dir("straight")


@pytest.fixture(scope="module")
def killed_at_5(runner) -> Path:
    """A run killed (SIGKILL) in step 5, mid-epoch: copied by the cases that start from it."""
    crashed = runner.train("killed_at_5", fault="kill@step=5")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    return runner.run_dir("killed_at_5")


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped bit in the middle of the tensor data
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("case", "fault", "resumed_at"),
    [
        ("before the first checkpoint", "kill@step=1", 0),
        ("mid-epoch", "kill@step=5", 4),
        ("inside an accumulation group", "kill@step=5:micro=1", 4),
        ("while a checkpoint is written", "kill@save=4:bytes=65536", 3),
        ("at an epoch boundary", "kill@step=3", 3),
        ("while the epoch-end checkpoint is written", "kill@save=3", 2),
        ("truncated last.pt", "kill@step=5", 3),
        ("bit-flipped last.pt", "kill@step=5", 3),
    ],
)
def test_killed_run_resumes_to_the_same_bits(runner, reference, killed_at_5, case, fault, resumed_at):
    run_id = case.replace(" ", "-").replace(".", "")
    run = runner.run_dir(run_id)
    if fault == "kill@step=5":  # the same crash: a copy of the module's one
        shutil.copytree(killed_at_5, run)
    else:
        crashed = runner.train(run_id, fault=fault)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    if case.startswith("while"):
        assert list((run / "checkpoints").glob(".last.pt.*.tmp")), "the kill left a partial temporary file"
    if case.endswith("last.pt"):
        damage(run / "checkpoints" / "last.pt", case.split()[0])

    # Resume with a different DataLoader worker count: results must not depend on it.
    resumed = runner.train(run_id, "--resume", "--set", "data.num_workers=2")
    assert resumed.returncode == 0, resumed.stderr
    if resumed_at:
        assert f"resumed at step {resumed_at} " in resumed.stderr
    else:
        assert "training restarts from step 0" in resumed.stderr
    if case.endswith("last.pt"):
        assert "last.pt fails its checksum" in resumed.stderr and "last.prev.pt (step 3) instead" in resumed.stderr
        assert (run / "checkpoints" / "last.pt.corrupt").is_file()  # set aside, not deleted
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert_same_run(run, reference)


def test_sigterm_stops_at_a_step_boundary_with_a_resume_hint(runner, reference):
    run = runner.run_dir("sigterm")
    stopped = runner.train("sigterm", fault="term@step=5")  # a real SIGTERM, mid-epoch
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Training stopped by SIGTERM after step 5" in stopped.stderr and "Traceback" not in stopped.stderr
    hint = stopped.stderr.split("Resume with:")[1].strip().splitlines()[0]
    assert hint.startswith("detpact train ") and "--run-id sigterm --resume" in hint
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["global_step"] == 5
    status = json.loads((run / "status.json").read_text())
    assert (status["phase"], status["end_reason"]) == ("stopped", "signal")
    report = json.loads((run / "reports" / "train_report.json").read_text())
    assert report["end_reason"] == "signal" and report["counters"]["steps"] == 5

    resumed = runner.train("sigterm", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 5 " in resumed.stderr
    assert_same_run(run, reference)


def test_fresh_runs_are_identical_whatever_the_worker_count(runner, reference):
    for run_id, extra in (("again", []), ("workers", ["--set", "data.num_workers=2"])):
        result = runner.train(run_id, *extra)
        assert result.returncode == 0, result.stderr
        assert_same_run(runner.run_dir(run_id), reference)
    other_seed = runner.train("seed1", "--set", "run.seed=1")
    assert other_seed.returncode == 0, other_seed.stderr
    with pytest.raises(AssertionError):
        assert_same_run(runner.run_dir("seed1"), reference)
    meta = json.loads((reference / "reports" / "run_meta.json").read_text())
    assert meta["determinism"]["deterministic"] is True and meta["determinism"]["num_threads"] == torch.get_num_threads()


class Payload:
    """Unpickling this writes a file: proof that a payload ran."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@pytest.mark.parametrize("manifest_forged", [False, True])
def test_malicious_last_pt_never_runs(runner, reference, tmp_path, manifest_forged):
    run = tmp_path / "runs" / "evil"
    shutil.copytree(reference, run)
    sentinel = tmp_path / "pwned"
    last = run / "checkpoints" / "last.pt"
    torch.save({"format_version": 1, "model": Payload(sentinel)}, last)
    if manifest_forged:  # the attacker also rewrote the checksum: the load itself must refuse
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["files"]["checkpoints/last.pt"]["sha256"] = hashlib.sha256(last.read_bytes()).hexdigest()
        (run / "manifest.json").write_text(json.dumps(manifest))
    env = make_env(tmp_path / "runs", Path(runner.env["DETPACT_CACHE_DIR"]))
    result = run_cli(["train", str(runner.config), "--run-id", "evil", "--resume", *SETS], env, tmp_path)
    if manifest_forged:
        assert result.returncode == 2 and "was refused" in result.stderr and "Traceback" not in result.stderr
    else:  # fails its checksum before anything is unpickled: falls back to last.prev.pt
        assert result.returncode == 0, result.stderr
        assert "last.pt fails its checksum" in result.stderr
    assert not sentinel.exists()


def test_runs_verify_passes_then_names_the_altered_file(runner, reference, tmp_path):
    env = runner.env
    passed = run_cli(["runs", "verify", str(reference)], env, tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "verify: PASS" in passed.stdout and "best.pt re-evaluated" in passed.stdout
    by_id = run_cli(["runs", "verify", "straight", "--no-eval", "--json"], env, tmp_path)  # a run id works too
    assert by_id.returncode == 0 and json.loads(by_id.stdout)["passed"] is True

    altered = tmp_path / "altered"
    shutil.copytree(reference, altered)
    metrics = altered / "reports" / "val_metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"map50"', '"map50" ', 1))
    failed = run_cli(["runs", "verify", str(altered), "--no-eval"], env, tmp_path)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "verify: FAIL" in failed.stdout and "reports/val_metrics.jsonl" in failed.stdout


def test_runs_verify_fails_on_any_altered_artifact(runner, reference, tmp_path):
    recorded = json.loads((reference / "manifest.json").read_text())["files"]
    assert {"checkpoints/last.pt", "checkpoints/last.prev.pt", "checkpoints/best.pt",
            "reports/train_metrics.jsonl", "reports/run_meta.json"} <= set(recorded)
    for name in recorded:
        run = tmp_path / name.replace("/", "_")
        shutil.copytree(reference, run)
        with (run / name).open("r+b") as handle:  # one flipped bit, in place
            handle.seek(handle.seek(0, 2) // 2)
            byte = handle.read(1)
            handle.seek(-1, 1)
            handle.write(bytes([byte[0] ^ 0x01]))
        failed = [c.name for c in api.verify(run, environ=runner.env, reevaluate=False) if c.status == "fail"]
        assert name in failed, name

    forged = tmp_path / "forged"
    shutil.copytree(reference, forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (forged / "manifest.json").write_text(json.dumps(manifest))
    checks = {c.name: c for c in api.verify(forged, environ=runner.env, reevaluate=False)}
    assert checks["../../etc/passwd"].status == "fail" and "altered" in checks["../../etc/passwd"].detail


def test_runs_verify_reevaluates_best_exactly(runner, reference, tmp_path):
    run = tmp_path / "rerecorded"
    shutil.copytree(reference, run)
    best = run / "checkpoints" / "best.pt"
    bundle = torch.load(best, weights_only=True)
    recorded = bundle["best_metric"]["value"]
    assert bundle["best_metric"]["metric"] == "map50_95" and recorded == bundle["best_metric"]["map50_95"]
    bundle["best_metric"]["value"] = float(np.nextafter(recorded, 1.0))  # off by one ulp
    save_checkpoint(best, bundle)
    write_manifest(RunDir(run))  # with a consistent manifest, only the re-evaluation can tell
    checks = {c.name: c for c in api.verify(run, environ=runner.env)}
    assert checks["checkpoints/best.pt"].status == "pass" and checks["dataset fingerprint"].status == "pass"
    assert checks["best.pt re-evaluated"].status == "fail"
    assert f"map50_95 {recorded!r} differs" in checks["best.pt re-evaluated"].detail


def test_config_drift_is_refused_unless_allowed_and_then_recorded(runner, reference, tmp_path):
    shutil.copytree(reference, tmp_path / "runs" / "longer")
    env = make_env(tmp_path / "runs", Path(runner.env["DETPACT_CACHE_DIR"]))
    longer = ["train", str(runner.config), "--run-id", "longer", "--resume", *SETS, "--set", "train.epochs=3"]
    refused = run_cli(longer, env, tmp_path)
    assert refused.returncode == 2 and "train.epochs: 2 -> 3" in refused.stderr and "--allow-drift" in refused.stderr

    extended = run_cli([*longer, "--allow-drift"], env, tmp_path)
    assert extended.returncode == 0, extended.stderr
    run = tmp_path / "runs" / "longer"
    assert [r["step"] for r in metric_lines(run, "train_metrics.jsonl")] == list(range(1, 10))
    drift = json.loads((run / "reports" / "run_meta.json").read_text())["resumes"][-1]["allowed_drift"]
    assert drift["config"]["changes"] == ["train.epochs: 2 -> 3"]
    checks = api.verify(run, environ=env, reevaluate=False)
    assert [c.name for c in checks if c.status == "fail"] == []
