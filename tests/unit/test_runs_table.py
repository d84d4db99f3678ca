"""The pure parts of `runs list / show / compare`: config differences key by key, metric
deltas, the best validation of a run without a report, run folder discovery, artifact
states against the manifest."""

from __future__ import annotations

import json

import pytest

from detpact.commands.runs_compare import MISSING, config_differences, flatten, is_hashed, metric_differences
from detpact.commands.runs_table import (
    RunRecords,
    artifact_status,
    best_of,
    fmt_duration,
    list_runs,
    run_folders,
    seconds_between,
)
from detpact.errors import DetpactError
from detpact.run.contract import RunDir, write_manifest


def test_identical_configs_have_no_differences_whatever_the_key_order():
    a = {"run": {"name": "x", "seed": 0}, "train": {"optimizer": {"lr": 0.002, "betas": [0.9, 0.999]}}}
    b = {"train": {"optimizer": {"betas": [0.9, 0.999], "lr": 0.002}}, "run": {"seed": 0, "name": "x"}}
    assert config_differences([a, b]) == []
    assert config_differences([a, a, b]) == []


def test_differences_name_exactly_the_changed_leaves_dotted():
    a = {"run": {"name": "x", "seed": 0}, "train": {"optimizer": {"lr": 0.002, "betas": [0.9, 0.999]}}, "task": "t"}
    b = json.loads(json.dumps(a))
    c = json.loads(json.dumps(a))
    b["train"]["optimizer"]["lr"] = 0.004
    c["train"]["optimizer"]["betas"] = [0.9, 0.99]
    c["run"]["name"] = "y"
    del c["task"]
    rows = config_differences([a, b, c])
    assert [row["key"] for row in rows] == ["run.name", "task", "train.optimizer.betas", "train.optimizer.lr"]
    by_key = {row["key"]: row for row in rows}
    assert by_key["train.optimizer.lr"]["values"] == [0.002, 0.004, 0.002]
    assert by_key["task"]["values"] == ["t", "t", MISSING]
    assert {key: row["hashed"] for key, row in by_key.items()} == {
        "run.name": False, "task": False, "train.optimizer.betas": True, "train.optimizer.lr": True}


def test_flatten_keeps_lists_and_empty_sections_as_leaves():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2], "e": {}}}) == {"a.b.c": 1, "a.d": [1, 2], "a.e": {}}
    assert is_hashed("logging.progress") is False and is_hashed("data.num_workers") is False
    assert is_hashed("data.image_size") is True and is_hashed("run.seed") is True


def test_metric_deltas_are_against_the_first_run():
    rows = metric_differences([{"best map50": 0.5, "steps": 10}, {"best map50": 0.75, "steps": 12},
                               {"best map50": None, "steps": 8}])
    by_name = {row["metric"]: row for row in rows}
    assert by_name["best map50"]["deltas"] == [None, pytest.approx(0.25), None]
    assert by_name["steps"]["deltas"] == [None, 2, -2]


def records(tmp_path, *, report=None, history=(), config=None) -> RunRecords:
    return RunRecords(RunDir(tmp_path), config, None, None, report, list(history), [])


def test_best_of_a_run_without_report_follows_its_best_rule(tmp_path):
    history = [{"step": 3, "map50_95": 0.2, "ar_max": 0.6}, {"step": 6, "map50_95": 0.4, "ar_max": 0.5}]
    assert best_of(records(tmp_path, history=history)) == ("map50_95", 0.4, 6)
    rule = {"train": {"checkpoint": {"best_metric": "ar_max", "best_mode": "min"}}}
    assert best_of(records(tmp_path, history=history, config=rule)) == ("ar_max", 0.5, 6)
    report = {"best": {"metric": "map50_95", "value": 0.3, "step": 3}}  # the report wins when there is one
    assert best_of(records(tmp_path, history=history, report=report)) == ("map50_95", 0.3, 3)
    assert best_of(records(tmp_path)) == ("map50_95", None, None)


def test_durations():
    assert seconds_between("2026-01-01T10:00:00+00:00", "2026-01-01T11:01:05+00:00") == 3665
    assert seconds_between(None, "2026-01-01T11:01:05+00:00") is None and seconds_between("soon", "later") is None
    assert [fmt_duration(s) for s in (None, 5, 65, 3665)] == ["-", "5s", "1m05s", "1h01m"]


def fake_run(root, name, start=None, phase="done", report=True):
    run = RunDir(root / name)
    run.create()
    if report:
        run.train_report_json.write_text(json.dumps({"best": {"metric": "map50", "value": 0.5, "step": 4},
                                                     "counters": {"steps": 8}}))
    run.config_resolved.write_text("task: shapes\n")
    run.status.write_text(json.dumps({"phase": phase}))
    run.run_meta.write_text(json.dumps({"start_time": start, "config_hash": "ab" * 32}))
    return run


def test_listing_skips_what_is_not_a_run_and_marks_damage(tmp_path):
    fake_run(tmp_path, "late", "2026-02-01T00:00:00+00:00", phase="train")
    fake_run(tmp_path, "early", "2026-01-01T00:00:00+00:00")
    torn = fake_run(tmp_path, "torn", "2026-01-15T00:00:00+00:00")
    torn.run_meta.write_text('{"start_')
    (tmp_path / "registry.db").write_bytes(b"SQLite format 3\x00")
    (tmp_path / "notes").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "status.json").write_text("{}")
    assert [run.root.name for run in run_folders(tmp_path)] == ["early", "late", "torn"]
    rows = list_runs(tmp_path)
    # torn has no readable start: its folder's time (now) puts it last.
    assert [(r.run_id, r.status) for r in rows] == [("early", "done"), ("late", "train"), ("torn", "damaged")]
    assert rows[2].problems == ["reports/run_meta.json is unreadable"]
    assert rows[0].task == "shapes" and rows[0].config_hash == "ab" * 32 and rows[0].steps == 8
    assert (rows[0].best_metric, rows[0].best_value, rows[0].best_step) == ("map50", 0.5, 4)
    with pytest.raises(DetpactError, match="Runs root not found"):
        run_folders(tmp_path / "nowhere")


def test_a_finished_run_without_its_report_is_damaged(tmp_path):
    fake_run(tmp_path, "done_no_report", report=False)
    fake_run(tmp_path, "running", phase="train", report=False)
    rows = {r.run_id: r for r in list_runs(tmp_path)}
    assert rows["done_no_report"].problems == ["reports/train_report.json is missing"]
    assert rows["running"].status == "train" and rows["running"].problems == []


def test_artifact_states_against_the_manifest(tmp_path):
    run = fake_run(tmp_path, "r")
    run.best_ckpt.write_bytes(b"x" * 10)
    run.last_ckpt.write_bytes(b"y" * 10)
    run.val_metrics.write_text("{}\n")
    write_manifest(run)
    run.best_ckpt.write_bytes(b"x" * 11)  # grown since
    run.val_metrics.unlink()  # gone
    run.train_report_md.write_text("# new\n")  # never recorded
    states = {row["path"]: row["status"] for row in artifact_status(run)}
    assert states["checkpoints/last.pt"] == "ok" and states["checkpoints/best.pt"] == "size differs"
    assert states["reports/val_metrics.jsonl"] == "missing" and states["reports/train_report.md"] == "unlisted"
