"""`detpact runs list / show / compare` on two real tiny runs that differ in three config
keys (one of them outside the config hash), beside a damaged run folder and a file that
is not a run: compare names exactly those keys, a copy with the same config shows none,
the curve plot is a real PNG, and bad run names are refused without a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_cli, train_tiny_run
from detpact.commands import runs_table

CHANGED = {"train.optimizer.lr": 0.004, "data.augment.hsv_h": 0.02, "run.name": "other"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """(environment, work folder, runs root) holding tiny, tiny_lr (CHANGED), a damaged copy and a file."""
    root = tmp_path_factory.mktemp("runs_cli")
    env, tiny, _ = train_tiny_run(root, cache_dir, "--set", "train.epochs=1")
    sets = [word for key, value in CHANGED.items() for word in ("--set", f"{key}={value}")]
    second = run_cli(["train", str(root / "tiny.yaml"), "--run-id", "tiny_lr", "--set", "train.epochs=1", *sets],
                     env, root)
    assert second.returncode == 0, second.stderr
    runs_root = tiny.parent
    (runs_root / "registry.db").write_bytes(b"SQLite format 3\x00")  # another tool's file in the runs root
    (runs_root / "notes").mkdir()  # a folder that is no run
    broken = runs_root / "broken"
    shutil.copytree(tiny / "reports", broken / "reports")
    (broken / "status.json").write_text('{"phase": "tra')  # torn by a crash
    return env, root, runs_root


def test_compare_lists_exactly_the_changed_keys_and_plots_the_curves(runs):
    env, root, _ = runs
    png = root / "curves.png"
    result = run_cli(["runs", "compare", "tiny", "tiny_lr", "--out", str(png), "--json"], env, root)
    assert result.returncode == 0, result.stderr
    comparison = json.loads(result.stdout)
    differences = {row["key"]: row for row in comparison["config_differences"]}
    assert set(differences) == set(CHANGED)
    assert differences["train.optimizer.lr"]["values"] == [0.002, 0.004]
    assert {key: row["hashed"] for key, row in differences.items()} == {
        "train.optimizer.lr": True, "data.augment.hsv_h": True, "run.name": False}
    assert comparison["same_config_hash"] is False
    metrics = {row["metric"]: row for row in comparison["metrics"]}
    for name in ("best map50_95", "final map50_95", "best map50", "final map50", "steps"):
        assert metrics[name]["deltas"][0] is None and metrics[name]["values"][0] is not None, name
    assert metrics["steps"]["values"] == [3, 3] and metrics["steps"]["deltas"] == [None, 0]
    loss = metrics["loss, last 10 steps"]
    assert loss["deltas"][1] == pytest.approx(loss["values"][1] - loss["values"][0]) and loss["deltas"][1] != 0

    assert comparison["plot"] == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 300
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # axes, lines and labels drawn, not a blank canvas

    table = run_cli(["runs", "compare", "tiny", "tiny_lr"], env, root)  # the table, default plot path
    assert table.returncode == 0, table.stderr
    assert "3 key(s) differ" in table.stdout and "run.name (not hashed)" in table.stdout
    assert "train.optimizer.lr" in table.stdout and (root / "runs_compare_tiny_tiny_lr.png").is_file()


def test_compare_finds_no_difference_between_identical_configs(runs):
    env, root, runs_root = runs
    copy = runs_root / "tiny_copy"
    shutil.copytree(runs_root / "tiny" / "reports", copy / "reports")
    shutil.copy(runs_root / "tiny" / "status.json", copy / "status.json")
    # The same config written differently (keys sorted, another layout): no difference either.
    config = yaml.safe_load((copy / "reports" / "config_resolved.yaml").read_text())
    (copy / "reports" / "config_resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=True, indent=4))
    try:
        result = run_cli(["runs", "compare", "tiny", str(copy), "--out", str(root / "same.png"), "--json"], env, root)
    finally:
        shutil.rmtree(copy)
    assert result.returncode == 0, result.stderr
    comparison = json.loads(result.stdout)
    assert comparison["config_differences"] == [] and comparison["same_config_hash"] is True
    assert all(row["deltas"][1] in (0, None) for row in comparison["metrics"] if row["metric"] != "train seconds")


def test_list_and_show(runs):
    env, root, runs_root = runs
    listed = run_cli(["runs", "list", "--json"], env, root)
    assert listed.returncode == 0, listed.stderr
    rows = {row["run_id"]: row for row in json.loads(listed.stdout)}
    assert list(rows) == ["broken", "tiny", "tiny_lr"]  # by start time (broken's is tiny's, copied), then id
    meta = json.loads((runs_root / "tiny" / "reports" / "run_meta.json").read_text())
    tiny = rows["tiny"]
    assert (tiny["status"], tiny["task"], tiny["steps"], tiny["config_hash"]) == ("done", "shapes", 3,
                                                                                   meta["config_hash"])
    assert tiny["best_metric"] == "map50_95" and tiny["best_value"] is not None and tiny["duration_s"] >= 0
    assert rows["tiny_lr"]["config_hash"] != tiny["config_hash"]
    assert rows["broken"]["status"] == "damaged" and rows["broken"]["problems"] == ["status.json is unreadable"]

    table = run_cli(["runs", "list", "--root", str(runs_root)], {k: v for k, v in env.items()
                                                                 if k != "DETPACT_OUTPUT_DIR"}, root)
    assert table.returncode == 0, table.stderr
    assert "damaged broken: status.json is unreadable" in table.stdout and "3 run(s)" in table.stdout
    assert "registry.db" not in table.stdout and "notes" not in table.stdout

    shown = run_cli(["runs", "show", "tiny", "--json"], env, root)
    assert shown.returncode == 0, shown.stderr
    show = json.loads(shown.stdout)
    assert show["summary"]["config_hash"] == meta["config_hash"]
    assert show["dataset"]["fingerprint"] == meta["dataset_fingerprint"] and show["dataset"]["num_val"] == 6
    assert show["counters"]["steps"] == 3 and set(show["final"]) >= {"map50_95", "map50"}
    artifacts = {row["path"]: row["status"] for row in show["artifacts"]}
    assert artifacts["checkpoints/best.pt"] == "ok" and set(artifacts.values()) == {"ok"}

    text = run_cli(["runs", "show", str(runs_root / "broken")], env, root)
    assert text.returncode == 0, text.stderr
    assert "damaged" in text.stdout and meta["dataset_fingerprint"] in text.stdout


def test_bad_run_names_are_refused(runs, monkeypatch, capsys):
    env, root, runs_root = runs
    result = run_cli(["runs", "show", "missing_run"], env, root)  # through the real entry point
    assert result.returncode == 2 and "Run not found" in result.stderr and "Traceback" not in result.stderr
    # The rest in this process, through the same function the entry point calls.
    monkeypatch.setenv("DETPACT_OUTPUT_DIR", str(runs_root))
    monkeypatch.chdir(runs_root)
    for args, message in [
        (["show", ".."], "not a detpact run folder"),
        (["show", "notes"], "not a detpact run folder"),
        (["compare", "tiny"], "at least two runs"),
        (["compare", "tiny", str(runs_root / "tiny")], "named twice"),
        (["compare", "tiny", "tiny_lr", "--out", "plot.jpg"], "ending in .png"),
        (["compare", "tiny", "tiny_lr", "--out", "no_folder/plot.png"], "does not exist"),
        (["list", "--root", "no_such_folder"], "Runs root not found"),
    ]:
        assert runs_table.main(args) == 2, args
        assert message in capsys.readouterr().err, args
