"""Test-time training end to end (issue 16): a tiny run trained with model.mim_decoder logs
loss_mim; `detpact eval RUN --ttt --ttt-preset mim_safe` and `detpact predict ... --ttt`
adapt a copy of it, report what the adaptation did (guard counts included), and leave the
run's checkpoints as they were."""

from __future__ import annotations

import hashlib
import json

import onnx
import pytest

from conftest import run_cli, train_tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mim_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("ttt")
    env, run, val_images = train_tiny_run(root, cache_dir, "--set", "model.mim_decoder=true", "--set",
                                          "train.epochs=1", "--set", "export.exporter=torchscript")  # the quick one
    return root, env, run, val_images


def digests(run) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "checkpoints").glob("*.pt"))}


def test_training_logs_the_mim_loss(mim_run):
    _, _, run, _ = mim_run
    lines = [json.loads(line) for line in (run / "reports" / "train_metrics.jsonl").read_text().splitlines()]
    assert lines and all(line["loss_mim"] > 0 for line in lines)


def test_eval_with_mim_safe_reports_the_adaptation_and_keeps_the_checkpoints(mim_run):
    root, env, run, _ = mim_run
    before = digests(run)
    result = run_cli(["eval", str(run), "--ttt", "--ttt-preset", "mim_safe", "--ttt-batch-size", "4",
                      "--ttt-max-batches", "1", "--json"], env, root)
    assert result.returncode == 0, result.stderr
    assert "map50_95" in json.loads(result.stdout)
    report = json.loads((run / "reports" / "eval_best_ttt.json").read_text())
    ttt = report["ttt"]
    assert ttt["settings"]["method"] == "mim" and ttt["settings"]["preset"] == "mim_safe"
    assert (ttt["batches"], ttt["adapted_batches"]) == (2, 1)  # 6 validation images in batches of 4
    assert set(ttt["guards"]) == {"drift_reset", "rollback", "entropy_stop"}
    assert not (run / "reports" / "eval_best.json").exists()  # the plain evaluation's report is another file
    assert digests(run) == before


def test_predict_with_tent_writes_the_adaptation_into_the_predictions_file(mim_run):
    root, env, run, val_images = mim_run
    out = root / "preds.json"
    result = run_cli(["predict", str(run), str(val_images), "--out", str(out), "--ttt", "--ttt-reset", "stream",
                      "--no-progress"], env, root)
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.read_text())["meta"]
    assert meta["ttt"]["settings"]["method"] == "tent" and meta["ttt"]["batches"] == 1
    assert "guards fired" in result.stderr  # the log line


def test_predict_with_tent_and_tta_adapts_on_each_view(mim_run):
    root, env, run, val_images = mim_run
    out = root / "preds_tta.json"
    result = run_cli(["predict", str(run), str(val_images), "--out", str(out), "--ttt", "--tta",
                      "--no-progress"], env, root)
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.read_text())["meta"]
    views = len(meta["tta"]["scales"]) * (2 if meta["tta"]["flip"] else 1)
    assert views == 6 and meta["ttt"]["batches"] == views  # the 6 images make one batch, adapted per view


def test_the_scenario_suite_adapts_afresh_on_each_split(mim_run):
    root, env, run, _ = mim_run
    settings, out = root / "noise.yaml", root / "scenarios_ttt.json"
    settings.write_text("scenarios:\n  - {corruption: gaussian_noise, severities: [5]}\n")
    result = run_cli(["test", str(settings), "--run", str(run), "--ttt", "--out", str(out)], env, root)
    assert result.returncode == 0, result.stderr
    ttt = json.loads(out.read_text())["ttt"]
    assert [split["batches"] for split in ttt["per_split"]] == [1, 1]  # clean, then gaussian_noise-5
    assert ttt["batches"] == 2 and "test-time training (safe)" in result.stdout
    assert not (run / "reports" / "scenarios.json").exists()  # the run keeps the model's own report


def test_the_export_leaves_the_mim_decoder_out(mim_run):
    root, env, run, _ = mim_run
    result = run_cli(["export", str(run)], env, root)
    assert result.returncode == 0, result.stderr
    assert "parity pass" in result.stdout
    names = [init.name for init in onnx.load(str(run / "exports" / "model.onnx")).graph.initializer]
    assert names and not [name for name in names if "mim" in name]
