"""Checkpoint writes are atomic and rotate last.pt -> last.prev.pt with checksums in the
manifest; resumes verify and fall back; loads are weights_only and fail with clear messages."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detpact.run.checkpoint as checkpoint_module
from detpact.errors import DetpactError, TrainingAborted
from detpact.run.atomic import stale_temp_files
from detpact.run.checkpoint import (
    FORMAT_VERSION,
    CheckpointRefused,
    commit_checkpoint,
    inference_state_dict,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from detpact.run.contract import RunDir, file_entry, read_manifest, write_manifest


def bundle(value: float = 1.0) -> dict:
    return {"format_version": FORMAT_VERSION, "model": {"w": torch.full((3,), value)}, "ema": None,
            "progress": {"global_step": 5}, "rng": {"python": (3, tuple(range(5)), None)}}


def test_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, bundle())
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3)) and loaded["progress"]["global_step"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert torch.equal(inference_state_dict(loaded)["w"], torch.ones(3))


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, bundle(1.0))
    with pytest.raises((pickle.PicklingError, AttributeError)):  # an unpicklable value fails mid-save
        save_checkpoint(path, {**bundle(2.0), "bad": lambda: None})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, bundle())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DetpactError, match="corrupt or truncated") as err:
        load_checkpoint(path)
    assert str(path) in err.value.message


class Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"format_version": 1, "model": Payload(sentinel)}, path)
    assert not sentinel.exists()
    with pytest.raises(DetpactError, match="was refused") as err:
        load_checkpoint(path)
    assert "io.open" in err.value.message  # the global it would have called, named
    assert not sentinel.exists()


def test_garbage_file_is_corrupt_not_unsafe(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DetpactError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_foreign_and_future_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(DetpactError, match="not a detpact checkpoint"):
        load_checkpoint(path)
    torch.save({"format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(DetpactError, match="Upgrade detpact"):
        load_checkpoint(path)
    with pytest.raises(DetpactError, match="Checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


# --- the run's checkpoint rotation: last.pt, last.prev.pt, best.pt and manifest.json ---


def make_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.create()
    return run


def step_bundle(step: int) -> dict:
    return {**bundle(float(step)), "progress": {"global_step": step}}


def test_rotation_keeps_previous_and_records_every_checksum(tmp_path):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=True)
    commit_checkpoint(run, step_bundle(2), best=False)
    commit_checkpoint(run, step_bundle(3), best=False)
    steps = {p.name: load_checkpoint(p)["progress"]["global_step"] for p in run.checkpoints.iterdir()}
    assert steps == {"last.pt": 3, "last.prev.pt": 2, "best.pt": 1}
    manifest = read_manifest(run)
    for path in (run.last_ckpt, run.prev_ckpt, run.best_ckpt):
        assert manifest[f"checkpoints/{path.name}"] == file_entry(path)


def test_fsync_then_rename_then_directory_fsync(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                   real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    commit_checkpoint(run, step_bundle(1), best=False)
    checkpoint_rename = events.index(("replace", "last.pt"))
    assert ("fsync", False) in events[:checkpoint_rename]  # the file's data reached the disk before the rename
    assert events[checkpoint_rename + 1] == ("fsync", True)  # then the rename itself (the folder)
    assert events.index(("replace", "manifest.json")) < checkpoint_rename  # checksums recorded first


def test_crash_between_manifest_and_rename_still_resumes(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=True)
    commit_checkpoint(run, step_bundle(2), best=False)
    commit_checkpoint(run, step_bundle(3), best=False)
    real_replace = checkpoint_module.replace

    def crash_on_rotation(src, dst):
        if Path(dst) == run.prev_ckpt:
            raise KeyboardInterrupt  # stands for the kill: manifest written, files not renamed yet
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module, "replace", crash_on_rotation)
    with pytest.raises(KeyboardInterrupt):
        commit_checkpoint(run, step_bundle(4), best=True)
    monkeypatch.setattr(checkpoint_module, "replace", real_replace)
    assert not stale_temp_files(run.checkpoints)
    # The manifest already describes step 4, but every file on disk is a complete older
    # checkpoint it vouches for: none is mistaken for a damaged one.
    loaded, path = resume_checkpoint(run)
    assert path == run.last_ckpt and loaded["progress"]["global_step"] == 3
    steps = {p.name: load_checkpoint(p)["progress"]["global_step"] for p in run.checkpoints.iterdir()}
    assert steps == {"last.pt": 3, "last.prev.pt": 2, "best.pt": 1}
    assert read_manifest(run)["checkpoints/last.pt"] == file_entry(run.last_ckpt)  # rewritten as it is now


def test_missing_last_falls_back_to_prev(tmp_path, caplog):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=False)
    commit_checkpoint(run, step_bundle(2), best=False)
    run.last_ckpt.unlink()  # e.g. killed between the two renames
    loaded, path = resume_checkpoint(run)
    assert path == run.prev_ckpt and loaded["progress"]["global_step"] == 1
    assert run.last_ckpt.is_file() and not run.prev_ckpt.exists()  # the rotation goes on from last.pt
    assert "last.pt is missing" in caplog.text and "last.prev.pt (step 1) instead" in caplog.text


def test_damaged_prev_and_best_are_set_aside_on_resume(tmp_path):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=True)
    commit_checkpoint(run, step_bundle(2), best=False)
    for path in (run.prev_ckpt, run.best_ckpt):
        path.write_bytes(path.read_bytes()[:-10])
    loaded, _ = resume_checkpoint(run)
    assert loaded["progress"]["global_step"] == 2
    names = sorted(p.name for p in run.checkpoints.iterdir())
    assert names == ["best.pt.corrupt", "last.prev.pt.corrupt", "last.pt"]
    assert list(read_manifest(run)) == ["checkpoints/last.pt"]  # never records a damaged file as good


def test_no_usable_checkpoint_names_both_files(tmp_path):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=False)
    commit_checkpoint(run, step_bundle(2), best=False)
    for path in (run.last_ckpt, run.prev_ckpt):
        path.write_bytes(b"garbage")
    with pytest.raises(DetpactError, match="no usable checkpoint") as err:
        resume_checkpoint(run)
    assert "last.pt fails its checksum" in err.value.message and "last.prev.pt fails its checksum" in err.value.message
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["last.prev.pt", "last.pt"]  # nothing moved


def test_unsafe_checkpoint_with_forged_checksum_is_refused_not_skipped(tmp_path):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=False)
    commit_checkpoint(run, step_bundle(2), best=False)
    sentinel = tmp_path / "pwned"
    torch.save({"format_version": 1, "model": Payload(sentinel)}, run.last_ckpt)
    write_manifest(run)  # forged: the manifest now vouches for the payload
    with pytest.raises(CheckpointRefused, match="was refused"):
        resume_checkpoint(run)
    assert not sentinel.exists()


def test_pickled_module_is_refused_naming_its_globals(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"format_version": 1, "model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointRefused) as err:
        load_checkpoint(path)
    assert "torch.nn.modules.linear.Linear" in err.value.message


def test_old_torch_is_refused():
    checkpoint_module.check_torch_version("2.13.0+cpu")
    for version in ("2.5.1", "2.9.0"):
        with pytest.raises(DetpactError, match="CVE-2026-24747"):
            checkpoint_module.check_torch_version(version)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("boom")])
def test_failed_write_keeps_previous_checkpoints(tmp_path, error):
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=True)
    commit_checkpoint(run, step_bundle(2), best=False)
    before = {p.name: p.read_bytes() for p in run.checkpoints.iterdir()}
    manifest_before = run.manifest.read_bytes()

    def fail(written: int) -> None:
        if written > 1000:
            raise error

    expected = TrainingAborted if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as err:
        commit_checkpoint(run, step_bundle(3), best=True, on_write=fail)
    if expected is TrainingAborted:
        assert "disk is full" in err.value.message and "--resume" in err.value.message
    assert {p.name: p.read_bytes() for p in run.checkpoints.iterdir()} == before  # no temp file, nothing touched
    assert run.manifest.read_bytes() == manifest_before


DISK_FULL_SCRIPT = """
import resource, signal, sys
from pathlib import Path
import torch
from detpact.errors import TrainingAborted
from detpact.run.checkpoint import commit_checkpoint
from detpact.run.contract import RunDir

run = RunDir(Path(sys.argv[1]))
run.create()
commit_checkpoint(run, {"format_version": 1, "model": {"w": torch.ones(1000)}, "progress": {"global_step": 1}},
                  best=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    commit_checkpoint(run, {"format_version": 1, "model": {"w": torch.ones(100_000)}, "progress": {"global_step": 2}},
                      best=False)
except TrainingAborted as exc:
    print(exc.message)
"""


def test_a_real_file_size_limit_is_reported_as_a_full_disk(tmp_path):
    run = RunDir(tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(run.root)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "The disk is full while writing the checkpoint of step 2" in result.stdout
    assert "previous checkpoints are intact" in result.stdout
    assert load_checkpoint(run.last_ckpt)["progress"]["global_step"] == 1
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["last.pt"]


# --- epoch snapshots (train.checkpoint.keep_epochs) ---


@pytest.mark.parametrize("crash_at", ["manifest", "replace:1", "replace:2", "replace:3", "replace:4", "remove:1", None])
def test_keep_epochs_leaves_the_last_two_after_a_crash_at_any_point_of_a_rotation(tmp_path, monkeypatch, crash_at):
    run = make_run(tmp_path)
    for epoch in (1, 2, 3):
        commit_checkpoint(run, step_bundle(10 * epoch), best=epoch == 1, epoch=epoch, keep_epochs=2)
    assert [p.name for p in run.epoch_snapshots()] == ["epoch_0002.pt", "epoch_0003.pt"]
    calls = {"replace": 0, "remove": 0}
    real = {"replace": checkpoint_module.replace, "remove": checkpoint_module.remove_quietly,
            "manifest": checkpoint_module.write_manifest}

    def counted(kind):
        def call(*args, **kwargs):
            if kind != "remove" or run.epoch_snapshots().count(Path(args[0])):
                calls[kind] += 1
                if crash_at == f"{kind}:{calls[kind]}":
                    raise KeyboardInterrupt  # stands for the kill
            return real[kind](*args, **kwargs)
        return call

    def manifest(*args, **kwargs):
        if crash_at == "manifest":
            raise KeyboardInterrupt
        return real["manifest"](*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "replace", counted("replace"))
    monkeypatch.setattr(checkpoint_module, "remove_quietly", counted("remove"))
    monkeypatch.setattr(checkpoint_module, "write_manifest", manifest)
    if crash_at is None:
        commit_checkpoint(run, step_bundle(40), best=True, epoch=4, keep_epochs=2)
    else:
        with pytest.raises(KeyboardInterrupt):
            commit_checkpoint(run, step_bundle(40), best=True, epoch=4, keep_epochs=2)
    monkeypatch.undo()

    resume_checkpoint(run, keep_epochs=2)
    snapshots = run.epoch_snapshots()
    # The new snapshot counts once it is in place; either way exactly the newest two stay.
    expected = ["epoch_0003.pt", "epoch_0004.pt"] if run.epoch_ckpt(4).is_file() else ["epoch_0002.pt", "epoch_0003.pt"]
    assert [p.name for p in snapshots] == expected
    recorded = read_manifest(run)
    for path in snapshots:
        assert recorded[f"checkpoints/{path.name}"] == file_entry(path)
        assert load_checkpoint(path)["progress"]["global_step"] == 10 * int(path.stem.split("_")[1])
    assert not stale_temp_files(run.checkpoints)
    # The rotation goes on from there.
    commit_checkpoint(run, step_bundle(50), best=False, epoch=5, keep_epochs=2)
    assert [p.name for p in run.epoch_snapshots()] == [expected[-1], "epoch_0005.pt"]
    assert load_checkpoint(run.best_ckpt)["progress"]["global_step"] in (10, 40)  # never touched by the rotation


def test_a_run_without_a_manifest_resumes_unverified_with_a_warning_and_is_recorded_again(tmp_path, caplog):
    """RELIABILITY row 11: the atomic rename is what commits a checkpoint, so a run whose
    manifest.json is gone still resumes from its newest complete file, says that it could
    not verify it, clears the orphan of an interrupted write and records the files again."""
    run = make_run(tmp_path)
    commit_checkpoint(run, step_bundle(1), best=True)
    commit_checkpoint(run, step_bundle(2), best=False)
    orphan = run.checkpoints / ".last.pt.x1y2.tmp"
    orphan.write_bytes(b"half a checkpoint")
    run.manifest.unlink()
    loaded, path = resume_checkpoint(run)
    assert path == run.last_ckpt and loaded["progress"]["global_step"] == 2
    assert "records no checkpoint checksums" in caplog.text
    assert not orphan.exists()
    assert read_manifest(run)["checkpoints/last.pt"] == file_entry(run.last_ckpt)
    assert read_manifest(run)["checkpoints/last.prev.pt"] == file_entry(run.prev_ckpt)
