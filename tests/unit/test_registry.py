"""The model registry: concurrent writers, best-of queries, CSV round trip, schema
version, rebuild from run folders, and recording that never fails its caller."""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detpact.commands.record import registry_for_command, registry_from_environment, registry_of_run
from detpact.config import validate_config
from detpact.errors import DetpactError
from detpact.run.contract import RunDir, write_manifest
from detpact.run.registry import RUN_COLUMNS, SCHEMA_VERSION, Registry
from detpact.run.registry_index import rebuild, record_run

# One writer process: importing only the registry module (no torch: it starts in a moment),
# it records 25 runs, each its own transaction, as fast as it can.
WRITER = """
import sys
from detpact.run.registry import Registry
assert "torch" not in sys.modules, "the registry module must not need torch"
registry, worker = Registry(sys.argv[1]), int(sys.argv[2])
for i in range(25):
    registry.put_run({"run_dir": f"/runs/w{worker}_{i}", "run_id": f"w{worker}_{i}", "task": f"t{worker % 2}",
                      "status": "finished", "metrics": {"map50_95": worker + i / 100}},
                     [{"kind": "eval", "name": "best", "metrics": {"map50_95": i}}])
"""


def run_row(run_id: str, task: str = "shapes", value: float | None = 0.5, started: str = "2026-01-01T00:00:00",
            **extra) -> dict:
    metrics = {} if value is None else {"map50_95": value, "map50": 1 - value}
    return {"run_dir": f"/runs/{run_id}", "run_id": run_id, "task": task, "status": "finished", "metrics": metrics,
            "config_hash": f"{run_id}hash", "started": started, **extra}


def test_eight_processes_registering_at_once_lose_nothing(tmp_path: Path):
    db = tmp_path / "new" / "registry.db"  # nothing there yet: the writers race to create it too
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for w in range(8)]
    outcomes = [(w.wait(timeout=120), w.stderr.read()) for w in writers]
    assert [rc for rc, _ in outcomes] == [0] * 8, [err for _, err in outcomes]
    assert not any("locked" in err for _, err in outcomes)
    registry = Registry(db)
    rows = registry.runs()
    assert len(rows) == 200 and len({row["run_dir"] for row in rows}) == 200
    assert all(len(registry.records(row["run_dir"])) == 1 for row in rows)
    assert len(registry.runs(task="t1")) == 100
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_best_for_max_and_min(tmp_path: Path):
    registry = Registry(tmp_path / "registry.db")
    for run_id, value, task in (("a", 0.30, "shapes"), ("b", 0.70, "shapes"), ("c", 0.10, "shapes"),
                                ("d", 0.99, "other"), ("e", None, "shapes")):
        registry.put_run(run_row(run_id, task, value))
    assert registry.best("shapes", "map50_95", "max")["run_id"] == "b"
    assert registry.best("shapes", "map50_95", "min")["run_id"] == "c"
    assert registry.best("shapes", "map50", "max")["run_id"] == "c"  # map50 = 1 - map50_95 here
    registry.put_run(run_row("f", "shapes", 0.70, started="2026-02-01T00:00:00"))
    assert registry.best("shapes", "map50_95")["run_id"] == "b"  # a tie goes to the earlier run
    with pytest.raises(DetpactError, match="Metrics recorded: map50, map50_95"):
        registry.best("shapes", "ar_max")
    with pytest.raises(DetpactError, match="its tasks: other, shapes"):
        registry.best("nope", "map50_95")
    with pytest.raises(DetpactError, match="Invalid metric name"):
        registry.best("shapes", "map50_95') OR 1=1 --")


def test_list_filters_by_task_and_config_hash_prefix(tmp_path: Path):
    registry = Registry(tmp_path / "registry.db")
    for run_id, task in (("a", "shapes"), ("b", "shapes"), ("c", "other")):
        registry.put_run(run_row(run_id, task))
    assert [r["run_id"] for r in registry.runs(task="shapes")] == ["a", "b"]
    assert [r["run_id"] for r in registry.runs(config_hash="bha")] == ["b"]
    assert registry.runs(task="other", config_hash="a") == []
    with pytest.raises(DetpactError, match="No run 'zzz'"):
        registry.run("zzz")


def test_export_csv_round_trips(tmp_path: Path):
    registry = Registry(tmp_path / "registry.db")
    registry.put_run(run_row("a", value=0.1 + 0.2, steps=6, best_value=0.30000000000000004, git_dirty=True,
                             checkpoints={"best": {"path": "/runs/a/checkpoints/best.pt", "sha256": "ab" * 32}},
                             versions={"torch": "2.13.0"}))
    registry.put_run(run_row("b, \"quoted\"\nline", task=None, value=None))
    assert registry.export_csv(tmp_path / "runs.csv") == 2
    types = {name: (kind.split()[0], is_json) for name, kind, is_json in RUN_COLUMNS}

    def decode(name: str, text: str):
        kind, is_json = types[name]
        if is_json:
            return json.loads(text)
        if text == "":
            return None
        return {"INTEGER": int, "REAL": float}.get(kind, str)(text) if name != "git_dirty" else text == "True"

    with (tmp_path / "runs.csv").open(newline="") as handle:
        back = [{name: decode(name, text) for name, text in row.items()} for row in csv.DictReader(handle)]
    assert back == registry.runs()
    assert back[0]["best_value"] == 0.30000000000000004 and back[0]["metrics"]["map50_95"] == 0.1 + 0.2


def test_a_newer_schema_is_refused(tmp_path: Path):
    db = tmp_path / "registry.db"
    Registry(db).put_run(run_row("a"))
    with sqlite3.connect(db) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DetpactError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this detpact"):
        Registry(db).runs()


def fake_run(root: Path, run_id: str, task: str, value: float, phase: str = "done") -> RunDir:
    """A run folder with the files training writes (no real checkpoint content needed)."""
    run = RunDir(root / run_id)
    run.create()
    run.config_resolved.write_text(yaml.safe_dump({"config_version": 1, "task": task}))
    run.run_meta.write_text(json.dumps({"run_id": run_id, "config_hash": f"{run_id}-hash", "start_time": "t0",
                                        "end_time": "t1", "dataset_fingerprint": "fp", "versions": {"torch": "x"},
                                        "git_sha": "abc", "git_dirty": False}))
    best = {"metric": "map50_95", "mode": "max", "value": value, "step": 2, "epoch": 1, "map50_95": value}
    run.train_report_json.write_text(json.dumps({"best": best, "end_reason": "steps_done", "counters": {"steps": 4}}))
    run.val_metrics.write_text("".join(json.dumps({"step": s, "map50_95": v}) + "\n" for s, v in ((2, value), (4, 0.0))))
    run.status.write_text(json.dumps({"phase": phase, "step": 4}))
    run.best_ckpt.write_bytes(b"best " + run_id.encode())
    run.last_ckpt.write_bytes(b"last " + run_id.encode())
    (run.reports / "eval_best.json").write_text(json.dumps({"time": "t2", "metrics": {"map50_95": value},
                                                            "source": {"checkpoint": "best"}}))
    write_manifest(run)
    return run


def snapshot(registry: Registry) -> list:
    return [(row, registry.records(row["run_dir"])) for row in registry.runs()]


def test_rebuild_restores_a_deleted_or_corrupt_database(tmp_path: Path):
    runs = [fake_run(tmp_path / "runs", "a", "shapes", 0.4), fake_run(tmp_path / "runs", "b", "shapes", 0.6, "failed")]
    db = tmp_path / "runs" / "registry.db"
    for run in runs:
        assert record_run(run, db)  # as training, eval and export record them
    original = snapshot(Registry(db))
    assert [(row["run_id"], row["status"], row["best_value"], row["metrics"]) for row, _ in original] == [
        ("a", "finished", 0.4, {"map50_95": 0.4}), ("b", "failed", 0.6, {"map50_95": 0.6})]
    assert original[0][0]["checkpoints"]["best"]["sha256"] == json.loads(runs[0].manifest.read_text())[
        "files"]["checkpoints/best.pt"]["sha256"]
    assert [(r["kind"], r["name"], r["path"], r["metrics"]) for r in original[0][1]] == [
        ("eval", "best", str(runs[0].best_ckpt.resolve()), {"map50_95": 0.4})]

    db.unlink()
    assert rebuild(db, [tmp_path / "runs"]) == 2
    assert snapshot(Registry(db)) == original

    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DetpactError, match="registry rebuild"):
        Registry(db).runs()
    assert rebuild(db, [tmp_path / "runs"]) == 2
    assert snapshot(Registry(db)) == original
    assert (tmp_path / "runs" / "registry.db.bak").read_bytes().startswith(b"this is not a database")


@pytest.mark.parametrize("broken", ["corrupt", "unwritable"])
def test_recording_into_a_broken_registry_warns_and_goes_on(tmp_path: Path, caplog, broken: str):
    run = fake_run(tmp_path / "runs", "a", "shapes", 0.4)
    if broken == "corrupt":
        db = tmp_path / "registry.db"
        db.write_bytes(b"garbage" * 1000)
    else:
        (tmp_path / "a_file").write_text("")
        db = tmp_path / "a_file" / "registry.db"  # its folder is a file: nothing can create it
    with caplog.at_level(logging.WARNING):
        assert record_run(run, db) is False
    assert "run a not recorded in the registry" in caplog.text


def test_where_the_registry_is(tmp_path: Path):
    cfg = validate_config({"config_version": 1, "data": {"format": "synthetic"}, "registry": {"path": "file.db"}})
    env = {"DETPACT_REGISTRY": str(tmp_path / "env.db")}
    cwd = Path.cwd()
    assert registry_from_environment(cfg, {}, []).registry.path == str(cwd / "file.db")
    assert registry_from_environment(cfg, env, []).registry.path == str(tmp_path / "env.db")
    on_cli = validate_config({**cfg.model_dump(mode="json"), "registry": {"path": "cli.db"}})
    assert registry_from_environment(on_cli, env, ["registry.path=cli.db"]).registry.path == str(cwd / "cli.db")
    default = validate_config({"config_version": 1, "data": {"format": "synthetic"}})
    assert registry_from_environment(default, {}, []).registry.path is None

    run = fake_run(tmp_path / "runs", "a", "shapes", 0.4)
    assert registry_of_run(run, {}) == tmp_path / "runs" / "registry.db"
    assert registry_of_run(run, env) == tmp_path / "env.db"
    config = yaml.safe_load(run.config_resolved.read_text())
    run.config_resolved.write_text(yaml.safe_dump({**config, "registry": {"path": "/x/trained_into.db"}}))
    assert registry_of_run(run, env) == Path("/x/trained_into.db")  # where the run itself is registered

    assert registry_for_command("cli.db", env) == Path("cli.db")
    assert registry_for_command(None, env) == tmp_path / "env.db"
    assert registry_for_command(None, {"DETPACT_OUTPUT_DIR": "/out"}) == Path("/out/registry.db")
    assert registry_for_command(None, {}) == Path("runs/registry.db")
