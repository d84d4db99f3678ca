"""Bad inputs: exit status 2, one short paragraph naming the problem, no traceback."""

from __future__ import annotations

import pytest
import yaml

from conftest import TINY_CONFIG, run_cli


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr
    message = err[err.index("error: "):]
    assert "\n\n" not in message  # one paragraph
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def write_config(tmp_path, **changes):
    data = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_config_key(tmp_path, env):
    path = write_config(tmp_path, train__lrate=0.1)
    assert_user_error(run_cli(["train", str(path)], env, tmp_path), "unknown key 'train.lrate'", "bad.yaml")


def test_wrong_value_type(tmp_path, env):
    path = write_config(tmp_path, train__batch_size="eight")
    assert_user_error(run_cli(["train", str(path)], env, tmp_path), "'train.batch_size'", "'eight'")


def test_missing_config_file(tmp_path, env):
    assert_user_error(run_cli(["train", str(tmp_path / "nope.yaml")], env, tmp_path),
                      "Config file not found", "nope.yaml")


def test_dataset_path_does_not_exist(tmp_path, env):
    path = write_config(tmp_path, data__format="yolo", data__path=str(tmp_path / "no_such_dataset"))
    result = run_cli(["train", str(path), "--run-id", "x"], env, tmp_path)
    assert_user_error(result, "Dataset folder not found", "no_such_dataset", "data.path")
    assert not (tmp_path / "runs" / "x").exists()


def test_resume_without_checkpoint(tmp_path, env, tiny_config):
    assert_user_error(run_cli(["train", str(tiny_config), "--run-id", "fresh", "--resume"], env, tmp_path),
                      "no checkpoint", "last.pt")


@pytest.mark.parametrize("run_id", ["a/b", "..", "../escape", "/abs", ".hidden", "sp ace"])
def test_invalid_run_ids(tmp_path, env, tiny_config, run_id):
    assert_user_error(run_cli(["train", str(tiny_config), "--run-id", run_id], env, tmp_path), "Invalid run id")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_corrupt_last_checkpoint(tmp_path, env, tiny_config):
    done = run_cli(["train", str(tiny_config), "--run-id", "c", "--set", "train.epochs=1"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    fake = tmp_path / "photo.jpg"
    fake.write_text("not an image")
    assert_user_error(run_cli(["predict", str(tmp_path / "runs" / "c"), str(fake), "--out", str(tmp_path / "p.json")],
                              env, tmp_path), "Cannot read image", "photo.jpg")
    last = tmp_path / "runs" / "c" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    metrics_before = (tmp_path / "runs" / "c" / "reports" / "train_metrics.jsonl").read_bytes()
    # One checkpoint so far (no last.prev.pt to fall back to): the resume is refused.
    assert_user_error(run_cli(["train", str(tiny_config), "--run-id", "c", "--set", "train.epochs=1", "--resume"],
                              env, tmp_path), "no usable checkpoint", "last.pt fails its checksum",
                      "last.prev.pt is missing")
    # Nothing written before is touched by the failed resume.
    assert (tmp_path / "runs" / "c" / "reports" / "train_metrics.jsonl").read_bytes() == metrics_before
    # eval of a corrupt checkpoint is refused the same way.
    (tmp_path / "runs" / "c" / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run_cli(["eval", str(tmp_path / "runs" / "c")], env, tmp_path), "corrupt or truncated", "best.pt")


def test_existing_run_without_resume_and_bad_run_dir(tmp_path, env, tiny_config):
    (tmp_path / "runs" / "taken" / "reports").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "reports" / "x").write_text("")
    assert_user_error(run_cli(["train", str(tiny_config), "--run-id", "taken"], env, tmp_path),
                      "already exists", "--resume")
    assert_user_error(run_cli(["eval", str(tmp_path / "runs" / "nothere")], env, tmp_path), "Run folder not found")
    assert_user_error(run_cli(["export", str(tmp_path)], env, tmp_path), "not a detpact run folder")


def test_debug_flag_shows_the_traceback(tmp_path, env):
    result = run_cli(["--debug", "train", str(tmp_path / "nope.yaml")], env, tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
