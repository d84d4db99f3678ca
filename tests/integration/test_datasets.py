"""Real datasets through the CLI: preflight of coco128 and of a corrupted copy of it,
`on_error: fail` stopping training with exit 2, `skip` training without the bad images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import SHARED_DATASETS as SHARED
from conftest import TINY_CONFIG, run_cli

REPO = Path(__file__).resolve().parents[2]
COCO128 = SHARED / "coco128"
pytestmark = pytest.mark.skipif(not COCO128.is_dir(), reason="needs ../shared/datasets/coco128")


def test_coco128_preflight_reports_exactly_its_known_quirks(tmp_path, env):
    # configs/coco128.yaml with its dataset YAML pointing at wherever the shared data is
    spec = yaml.safe_load((REPO / "configs" / "datasets" / "coco128.yaml").read_text())
    (tmp_path / "coco128.yaml").write_text(yaml.safe_dump({**spec, "path": str(COCO128)}))
    result = run_cli(["data", "preflight", str(REPO / "configs" / "coco128.yaml"), "--output-json",
                      str(tmp_path / "pf.json"), "--set", f"data.path={tmp_path / 'coco128.yaml'}"], env, REPO)
    assert result.returncode == 1, result.stderr  # the orphan label files are errors
    report = json.loads((tmp_path / "pf.json").read_text())
    assert sorted((f["kind"], f["file"]) for f in report["findings"]) == [
        ("image_without_label", "images/train2017/000000000250.jpg"),
        ("image_without_label", "images/train2017/000000000508.jpg"),
        ("label_without_image", "labels/train2017/000000000656.txt"),
        ("label_without_image", "labels/train2017/000000000659.txt")]
    assert report["splits"]["train"] == {"images": 128, "boxes": 929, "ignored_boxes": 0, "backgrounds": 2,
                                         "exif_rotated": 0}
    assert "preflight: FAIL (2 errors, 2 warnings" in result.stdout


def corrupted_copy(root: Path) -> dict[str, str]:
    """Six coco128 images and labels with one defect each; returns {defect: file}."""
    stems = sorted(p.stem for p in (COCO128 / "labels" / "train2017").glob("*.txt")
                   if (COCO128 / "images" / "train2017" / f"{p.stem}.jpg").is_file())[:8]
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for stem in stems:
        shutil.copy(COCO128 / "images" / "train2017" / f"{stem}.jpg", images)
        shutil.copy(COCO128 / "labels" / "train2017" / f"{stem}.txt", labels)
    truncated, out_of_range, negative, zero_area, duplicate, missing = stems[:6]
    data = (images / f"{truncated}.jpg").read_bytes()
    (images / f"{truncated}.jpg").write_bytes(data[: int(len(data) * 0.6)])
    with open(labels / f"{out_of_range}.txt", "a") as f:
        f.write("80 0.5 0.5 0.1 0.1\n")
    with open(labels / f"{negative}.txt", "a") as f:
        f.write("3 0.5 0.5 -0.1 0.2\n")
    with open(labels / f"{zero_area}.txt", "a") as f:
        f.write("3 0.5 0.5 0.0 0.2\n")
    first_line = (labels / f"{duplicate}.txt").read_text().splitlines()[0]
    with open(labels / f"{duplicate}.txt", "a") as f:
        f.write(first_line + "\n")
    (images / f"{missing}.jpg").unlink()
    names = yaml.safe_load((REPO / "configs" / "datasets" / "coco128.yaml").read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train",
                                                    "names": names}))
    return {"unreadable_image": f"images/train/{truncated}.jpg", "unknown_class": f"labels/train/{out_of_range}.txt",
            "bad_box": f"labels/train/{negative}.txt", "bad_box ": f"labels/train/{zero_area}.txt",
            "duplicate_box": f"labels/train/{duplicate}.txt",
            "label_without_image": f"labels/train/{missing}.txt"}


def test_corrupted_copy_every_defect_reported_and_training_refused(tmp_path, env):
    defects = corrupted_copy(tmp_path / "ds")
    config = {**TINY_CONFIG, "data": {"format": "yolo", "path": str(tmp_path / "ds" / "data.yaml"),
                                      "image_size": 64, "num_workers": 0}}
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))

    result = run_cli(["data", "preflight", str(config_path), "--output-json", str(tmp_path / "pf.json")], env, tmp_path)
    assert result.returncode == 1
    report = json.loads((tmp_path / "pf.json").read_text())
    found = sorted((f["kind"], f["file"]) for f in report["findings"])
    assert found == sorted((kind.strip(), file) for kind, file in defects.items())
    assert report["counts"]["errors"] == 5 and report["counts"]["warnings"] == 1
    for file in defects.values():
        assert file in result.stdout

    result = run_cli(["train", str(config_path), "--run-id", "bad"], env, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for kind, file in defects.items():
        if kind != "duplicate_box":  # a warning: deduplicated, not a reason to stop
            assert str(tmp_path / "ds" / file) in result.stderr, file
    assert not (tmp_path / "runs" / "bad").exists()  # stopped before a run folder was made

    result = run_cli(["train", str(config_path), "--run-id", "skip", "--set", "data.on_error=skip",
                      "--set", "train.max_steps=1", "--set", "train.batch_size=2"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    run_report = json.loads((tmp_path / "runs" / "skip" / "reports" / "train_report.json").read_text())
    skipped = run_report["dataset"]["skipped"]
    assert skipped["images"] == 4 and sorted(s["reasons"][0] for s in skipped["files"]) == [
        "bad_box", "bad_box", "label_without_image", "unknown_class", "unreadable_image"]
    assert run_report["dataset"]["num_train"] == 3 and run_report["dataset"]["preflight"]["errors"] == 5

    # the run evaluated on other data with the same classes: the coco128 COCO JSON; the run
    # folder is left as it is, and data with other classes is refused
    manifest = (tmp_path / "runs" / "skip" / "manifest.json").read_bytes()
    coco_json = {**config, "data": {"format": "coco", "path": str(COCO128), "image_size": 64, "num_workers": 0,
                                    "train": {"images": "images/train2017",
                                              "annotations": "annotations/instances_train2017.json"},
                                    "val": {"images": "images/train2017",
                                            "annotations": "annotations/instances_train2017.json"}}}
    (tmp_path / "json.yaml").write_text(yaml.safe_dump(coco_json))
    result = run_cli(["eval", "runs/skip", "--data", "json.yaml", "--out", "other.json", "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    other = json.loads((tmp_path / "other.json").read_text())
    assert other["data"] == "json.yaml" and set(other["metrics"]) >= {"map50_95", "map50"}
    assert (tmp_path / "runs" / "skip" / "manifest.json").read_bytes() == manifest
    assert not list((tmp_path / "runs" / "skip" / "reports").glob("eval_*.json"))
    shapes = tmp_path / "shapes.yaml"
    shapes.write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_cli(["eval", "runs/skip", "--data", str(shapes)], env, tmp_path)
    assert result.returncode == 2 and "other classes than the model" in result.stderr


def test_data_show_and_convert_commands(tmp_path, env, tiny_config):
    result = run_cli(["data", "show", str(tiny_config), "--out", "grid.png", "--count", "6"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "grid.png") as grid:  # 4 columns x 2 rows of 64 px tiles, 4 px apart
        assert grid.size == (4 * 64 + 3 * 4, 2 * 64 + 4)

    result = run_cli(["data", "convert", "--from", "coco", "--to", "yolo",
                      str(COCO128 / "annotations" / "instances_train2017.json"), "out"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "left out 10 ignore boxes" in result.stdout  # the crowd regions have no YOLO form
    result = run_cli(["data", "preflight", "out/dataset.yaml"], env, tmp_path)
    assert result.returncode == 0 and "preflight: PASS" in result.stdout, result.stdout
    result = run_cli(["data", "convert", "--from", "coco", "--to", "yolo",
                      str(COCO128 / "annotations" / "instances_train2017.json"), "out"], env, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # OUT is not empty
