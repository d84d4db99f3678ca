"""The registry end to end, on one tiny run: stopped by a signal (recorded as stopped),
resumed while its registry is corrupt (training goes on, with a warning), exported;
then `registry rebuild`, `eval`, `best`, `list`, `show` and `export-csv`."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_env, run_cli, write_tiny_config
from detpact.cli import build_parser, run_command
from detpact.commands import registry as registry_command
from detpact.errors import DetpactError
from detpact.run.registry import Registry

GARBAGE = b"not a database " * 300
EXPORT = ["--set", "export.onnx=true", "--set", "export.exporter=torchscript", "--set", "export.parity_map=false"]


def snapshot(db: Path) -> list:
    registry = Registry(db)
    return [(row, registry.records(row["run_dir"])) for row in registry.runs()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("registry")
    env = make_env(root / "runs", cache_dir)
    config = write_tiny_config(root / "tiny.yaml")
    stopped = run_cli(["train", str(config), "--run-id", "tiny", *EXPORT], {**env, "DETPACT_FAULT": "term@step=3"},
                      root)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    db = root / "runs" / "registry.db"
    stopped_rows = snapshot(db)
    for leftover in (db.with_name("registry.db-wal"), db.with_name("registry.db-shm")):
        leftover.unlink(missing_ok=True)
    db.write_bytes(GARBAGE)
    resumed = run_cli(["train", str(config), "--run-id", "tiny", "--resume", *EXPORT], env, root)
    return SimpleNamespace(root=root, env=env, config=config, run=root / "runs" / "tiny", db=db,
                           stopped_rows=stopped_rows, resumed=resumed)


def registry_cli(args: list[str], env: dict[str, str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`detpact registry ARGS` in this process (the CLI's own parser and command)."""
    capsys.readouterr()
    code = registry_command.run(build_parser().parse_args(["registry", *args]), environ=env)
    return code, capsys.readouterr().out


def test_a_stopped_run_is_recorded_and_a_corrupt_registry_does_not_fail_training(trained):
    [(row, records)] = trained.stopped_rows
    assert (row["run_id"], row["task"], row["status"], row["end_reason"], row["steps"]) == (
        "tiny", "shapes", "stopped", "signal", 3)
    assert row["best_step"] == 3 and row["metrics"]["num_images"] == 6 and row["metrics"]["num_dets"] > 0
    assert set(row["checkpoints"]) == {"best", "last"} and records == []
    assert row["run_dir"] == str(trained.run.resolve()) and len(row["config_hash"]) == 64
    assert row["versions"]["torch"] and row["started"] and row["dataset_fingerprint"]

    assert trained.resumed.returncode == 0, trained.resumed.stderr
    # Twice: after the export at the end of training (api.export's hook), and after training.
    assert trained.resumed.stderr.count("run tiny not recorded in the registry") == 2
    assert trained.db.read_bytes() == GARBAGE  # left as it was, for `registry rebuild`


def test_rebuild_recovers_the_run_from_its_folder(trained, capsys):
    code, out = registry_cli(["rebuild"], trained.env, capsys)
    assert code == 0 and "1 runs" in out
    [(row, records)] = rebuilt = snapshot(trained.db)
    manifest = json.loads((trained.run / "manifest.json").read_text())["files"]
    assert (row["status"], row["steps"], row["end_reason"]) == ("finished", 6, "steps_done")
    assert row["checkpoints"]["best"]["sha256"] == manifest["checkpoints/best.pt"]["sha256"]
    [export] = [r for r in records if r["kind"] == "export"]
    assert export["sha256"] == manifest["exports/model.onnx"]["sha256"] and export["details"]["verdict"] == "pass"
    assert (trained.db.parent / "registry.db.bak").read_bytes() == GARBAGE

    trained.db.unlink()
    registry_cli(["rebuild"], trained.env, capsys)
    assert snapshot(trained.db) == rebuilt
    trained.db.write_bytes(GARBAGE)
    with pytest.raises(DetpactError, match="registry rebuild"):
        registry_cli(["list"], trained.env, capsys)
    registry_cli(["rebuild"], trained.env, capsys)
    assert snapshot(trained.db) == rebuilt


def test_registry_eval_reproduces_the_recorded_metrics(trained, capsys, tmp_path: Path):
    registry_cli(["rebuild"], trained.env, capsys)
    other = ["--registry", str(tmp_path / "other.db")]  # a second registry holding the same run
    registry_cli(["rebuild", *other], trained.env, capsys)
    for data in ([], ["--data", str(trained.config)]):  # its own validation split, then the config's (the same)
        code, out = registry_cli(["eval", "--task", "shapes", "--json", *data, *other], trained.env, capsys)
        [result] = json.loads(out)
        assert code == 0 and result["run_id"] == "tiny"
        recorded = result["recorded"]
        assert result["metrics"] == recorded and recorded["num_images"] == 6
    # The evaluation on the run's own split was recorded, with the same numbers: by `detpact
    # eval` in the run's own registry, and by `registry eval` in the one it evaluated.
    for where in ([], other):
        code, out = registry_cli(["show", "tiny", "--json", *where], trained.env, capsys)
        [evaluation] = [r for r in json.loads(out)["records"] if r["kind"] == "eval"]
        assert evaluation["name"] == "best" and evaluation["metrics"] == recorded


def test_list_best_show_and_export_csv(trained, capsys, tmp_path: Path):
    registry_cli(["rebuild"], trained.env, capsys)
    # Through the CLI's dispatch (cli.run_command), with --registry instead of the environment.
    capsys.readouterr()
    args = ["registry", "best", "--task", "shapes", "--metric", "map50_95", "--mode", "min", "--registry",
            str(trained.db)]
    assert run_command(build_parser().parse_args(args)) == 0
    best = capsys.readouterr().out
    assert best.split()[:3] == ["tiny", "map50_95", "0.0"] and best.strip().endswith("checkpoints/best.pt")
    code, out = registry_cli(["list", "--task", "shapes", "--json"], trained.env, capsys)
    assert [row["run_id"] for row in json.loads(out)] == ["tiny"]
    code, out = registry_cli(["list", "--config-hash", "0000", "--json", "--registry", str(trained.db)], {}, capsys)
    assert json.loads(out) == []
    code, out = registry_cli(["show", "tiny"], trained.env, capsys)
    assert "finished" in out and "best.pt" in out and "export" in out
    code, out = registry_cli(["export-csv", str(tmp_path / "runs.csv")], trained.env, capsys)
    assert out.startswith("wrote 1 runs") and "tiny" in (tmp_path / "runs.csv").read_text()
    with pytest.raises(DetpactError, match="No registry at"):
        registry_cli(["list", "--registry", str(tmp_path / "none.db")], trained.env, capsys)
