"""Dataset folders as users have them, with no config keys beyond data.path: the shared
raccoon VOC folder and coco128's COCO JSON are recognised, preflighted, converted and
trained; a folder with two formats is refused; a label-name typo is warned about."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from conftest import SHARED_DATASETS, run_cli

pytestmark = pytest.mark.slow

RACCOON = SHARED_DATASETS / "raccoon"
COCO128_JSON = SHARED_DATASETS / "coco128" / "annotations"
# Only to keep the test quick: a tiny model, small images, one epoch.
QUICK = ["--set", "train.epochs=1", "--set", "data.image_size=64", "--set", "train.batch_size=16",
         "--set", "model.backbone.args.width_mult=0.0625", "--set", "model.backbone.args.depth_mult=0.33",
         "--set", "export.onnx=false", "--set", "logging.progress=false", "--set", "data.num_workers=0"]


def test_a_voc_folder_preflights_converts_and_trains_from_the_printed_command(tmp_path, env):
    preflight = run_cli(["data", "preflight", str(RACCOON), "--output-json", str(tmp_path / "pf.json")], env, tmp_path)
    assert preflight.returncode == 0, preflight.stderr
    report = json.loads((tmp_path / "pf.json").read_text())
    assert report["format"] == "voc" and report["class_names"] == ["raccoon"]
    assert report["splits"]["train"]["images"] == 200

    converted = run_cli(["data", "convert", "--to", "yolo", str(RACCOON), str(tmp_path / "yolo")], env, tmp_path)
    assert converted.returncode == 0, converted.stderr
    command = next(line for line in converted.stdout.splitlines() if line.startswith("train on it: "))
    words = shlex.split(command.removeprefix("train on it: ").split("   ")[0])
    assert words[:2] == ["detpact", "train"]
    trained = run_cli([*words[1:], "--run-id", "from_voc", *QUICK], env, tmp_path)
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((tmp_path / "runs" / "from_voc" / "reports" / "run_meta.json").read_text())
    split = meta["dataset"]["split"]
    assert (split["val_ratio"], split["stratify"], split["num_val"]) == (0.2, True, 40)  # held out: one folder
    assert split["source"] == "written" and split["manifest"]


def test_a_coco_json_folder_preflights_and_trains(tmp_path, env):
    preflight = run_cli(["data", "preflight", str(COCO128_JSON), "--output-json", str(tmp_path / "pf.json")],
                        env, tmp_path)
    assert preflight.returncode == 0, preflight.stderr
    report = json.loads((tmp_path / "pf.json").read_text())
    assert report["format"] == "coco" and len(report["class_names"]) == 80 and report["class_names"][0] == "person"
    converted = run_cli(["data", "convert", "--to", "yolo", str(COCO128_JSON), str(tmp_path / "yolo")], env, tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert "converted coco -> yolo: 128 images" in converted.stdout and "train on it: detpact train" in converted.stdout
    trained = run_cli(["train", str(COCO128_JSON), "--run-id", "coco", *QUICK], env, tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "COCO dataset" in trained.stderr
    both = run_cli(["data", "preflight", str(SHARED_DATASETS / "coco128")], env, tmp_path)  # YOLO labels + COCO JSON
    assert both.returncode == 2 and "more than one dataset format" in both.stderr


def test_yolo_labels_beside_voc_xml_are_refused_and_a_typo_is_warned(tmp_path, env):
    mixed = tmp_path / "mixed"
    for folder in ("images", "labels", "annotations"):
        (mixed / folder).mkdir(parents=True)
    for n in range(1, 26):
        shutil.copy(RACCOON / "images" / f"raccoon-{n}.jpg", mixed / "images")
        shutil.copy(RACCOON / "annotations" / f"raccoon-{n}.xml", mixed / "annotations")
    (mixed / "labels" / "raccoon-1.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    refused = run_cli(["data", "preflight", str(mixed)], env, tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "YOLO: labels/raccoon-1.txt" in refused.stderr and "VOC: annotations/" in refused.stderr
    assert "data.format" in refused.stderr

    shutil.rmtree(mixed / "labels")
    xml = mixed / "annotations" / "raccoon-7.xml"
    xml.write_text(xml.read_text().replace("<name>raccoon</name>", "<name>racoon</name>"))
    warned = run_cli(["data", "preflight", str(mixed)], env, tmp_path)
    assert warned.returncode == 0, warned.stderr
    assert "rare_class" in warned.stdout and "Did you mean 'raccoon'" in warned.stdout


def test_resuming_on_changed_data_is_refused_unless_allowed(tmp_path, env):
    data = tmp_path / "voc"
    for folder in ("images", "annotations"):
        (data / folder).mkdir(parents=True)
    for n in range(1, 11):
        shutil.copy(RACCOON / "images" / f"raccoon-{n}.jpg", data / "images")
        shutil.copy(RACCOON / "annotations" / f"raccoon-{n}.xml", data / "annotations")
    steps = ["--set", "train.epochs=2", "--set", "train.max_steps=3", "--set", "train.checkpoint.every_steps=1",
             "--set", "train.batch_size=4"]
    killed = run_cli(["train", str(data), "--run-id", "drift", *QUICK, *steps], {**env, "DETPACT_FAULT": "kill@step=2"},
                     tmp_path)
    assert killed.returncode == -9, killed.stderr
    xml = data / "annotations" / "raccoon-3.xml"
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>1", 1))  # one box edited
    refused = run_cli(["train", str(data), "--run-id", "drift", "--resume", *QUICK, *steps], env, tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "fingerprint differs" in refused.stderr and "--allow-drift" in refused.stderr
    allowed = run_cli(["train", str(data), "--run-id", "drift", "--resume", "--allow-drift", *QUICK, *steps], env,
                      tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    meta = json.loads((tmp_path / "runs" / "drift" / "reports" / "run_meta.json").read_text())
    drift = meta["resumes"][-1]["allowed_drift"]["dataset_fingerprint"]
    assert drift["checkpoint"] != drift["now"]
