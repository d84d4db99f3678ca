"""Checkpoint writes are atomic; loads are weights_only and fail with clear messages."""

from __future__ import annotations

import pickle

import pytest
import torch

from detpact.errors import DetpactError
from detpact.run.checkpoint import FORMAT_VERSION, inference_state_dict, load_checkpoint, save_checkpoint


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
