"""The pieces exact resume rests on: fault specs, the graceful-stop handler, RNG and
GradScaler round trips, metric-log truncation, loaders that leave the global RNG alone,
and the refusal to checkpoint non-finite weights."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from detpact.data.dataset import make_loader
from detpact.engine.faults import parse_faults
from detpact.engine.guards import NonFiniteGuard
from detpact.engine.runtime import rng_state, set_rng_state
from detpact.engine.stop import stop_on_signals
from detpact.errors import DetpactError, TrainingAborted
from detpact.run.metrics import read_jsonl, truncate_jsonl


def test_fault_specs():
    faults = parse_faults("kill@step=5:micro=2, kill@save=4:bytes=10, term@step=3, nan@step=2..4, kill@step=9")
    assert faults.kill_in_step == (5, 2) and faults.kill_in_save == (4, 10) and faults.term_after_step == 3
    assert faults.kill_after_step == 9 and faults.nan_steps == {2, 3, 4}
    assert parse_faults("kill@save=7").kill_in_save == (7, 1024)
    assert faults.save_monitor(3) is None and callable(faults.save_monitor(4))
    with pytest.raises(DetpactError, match="Bad DETPACT_FAULT entry 'kill@epoch=1'"):
        parse_faults("kill@epoch=1")


def test_raise_and_sleep_faults_act_once_on_their_rank():
    faults = parse_faults("raise@step=7@rank=1, sleep@save=2:seconds=0.2@rank=1", rank=1)
    assert faults.raise_after_step == 7 and faults.sleep_in_save == (2, 0.2)
    faults.after_step(6)
    with pytest.raises(RuntimeError, match="raise@step=7"):
        faults.after_step(7)
    slow = faults.save_monitor(2)
    started = time.perf_counter()
    slow(1024), slow(2048)  # sleeps at the first write only
    assert 0.2 <= time.perf_counter() - started < 0.4
    assert parse_faults("raise@step=7@rank=1", rank=0).raise_after_step is None
    # After torchrun restarts the group, the processes run clean.
    assert parse_faults("raise@step=7@rank=1", rank=1, attempt=1).raise_after_step is None


def test_first_signal_requests_a_stop_second_stops_now():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the process survives it
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_rng_streams_round_trip():
    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_grad_scaler_state_round_trips_into_a_fresh_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for _ in range(3):
        scaler.scale(param.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    fresh = torch.amp.GradScaler("cpu")  # built before the load, as in a resume
    fresh.load_state_dict(scaler.state_dict())
    assert fresh.state_dict() == scaler.state_dict() and scaler.state_dict()["_growth_tracker"] == 3


def test_loader_iteration_leaves_the_global_rng_alone():
    dataset = [(torch.zeros(1), {"i": i}) for i in range(4)]
    loader = make_loader(dataset, batch_size=2, num_workers=0)
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(before, torch.get_rng_state())


def test_truncate_jsonl_to_the_checkpoint_offset(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 3}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines) + '{"step": 4, "lo')  # a torn line from a crash
    offset = len("".join(lines[:2]).encode())
    truncate_jsonl(path, 2, offset)
    assert path.read_text() == "".join(lines[:2])  # byte-identical prefix
    path.write_text("".join(lines) + '{"step": 4, "lo')
    truncate_jsonl(path, 2)  # a bundle without offsets: by step, torn line dropped
    assert [r["step"] for r in read_jsonl(path)] == [1, 2] and path.read_text().endswith("\n")


def test_non_finite_weights_are_never_checkpointed():
    model = torch.nn.Linear(2, 2)
    guard = NonFiniteGuard(3, "runs/x/checkpoints/last.pt")
    guard.check_weights(7, model, None)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingAborted, match="step 7.*weight.*runs/x/checkpoints/last.pt"):
        guard.check_weights(7, model)
