"""`detpact smoke` on a tiny run trained through the real CLI: the CPU passes, a device
that is not there is skipped with the reason, a device that breaks fails without stopping
the others, and bad input is exit status 2. Plus the matching of two devices' detections."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import train_tiny_run
from detpact.commands import smoke
from detpact.errors import DetpactError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny run trained for one epoch, and one of its validation images."""
    _, run, val_images = train_tiny_run(tmp_path_factory.mktemp("smoke"), cache_dir, "--set", "train.epochs=1")
    return run, sorted(val_images.glob("*.jpg"))[0]


def smoke_cli(args: list[str]) -> int:
    parser = argparse.ArgumentParser()
    smoke.add_parser(parser.add_subparsers(dest="command"))
    return smoke.run(parser.parse_args(["smoke", *args]))


def test_cpu_passes_and_a_missing_cuda_is_skipped_with_the_reason(trained, tmp_path, capsys):
    run, image = trained
    out = tmp_path / "smoke.json"
    # --conf 0.01: a one-epoch model finds something to compare at that threshold
    assert smoke_cli([str(run), "--image", str(image), "--devices", "cpu,cuda", "--output-json", str(out),
                      "--conf", "0.01"]) == 0
    report = json.loads(out.read_text())
    bundle = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert report["checkpoint"] == str(run / "checkpoints" / "best.pt") and report["image"] == str(image)
    assert report["config_hash"] == bundle["config_hash"] and report["torch_version"] == torch.__version__
    assert report["tolerance"] == {"box_px": 1.0, "score": 0.01} and report["passed"] is True
    assert list(report["devices"]) == ["cpu", "cuda"]
    cpu = report["devices"]["cpu"]
    assert cpu["status"] == "pass" and cpu["amp"] == "bf16"
    assert cpu["load_seconds"] > 0 and cpu["inference_seconds"] > 0 and cpu["detections"] >= 0
    cuda = report["devices"]["cuda"]
    if torch.cuda.is_available():
        assert cuda["status"] in ("pass", "fail") and cuda["max_box_diff"] is not None
    else:
        assert cuda["status"] == "skip" and "CUDA" in cuda["reason"] and cuda["inference_seconds"] is None
    table = capsys.readouterr().out
    assert "cpu" in table and "PASS" in table and "smoke: PASS" in table


def test_a_checkpoint_file_works_and_the_cpu_runs_first_as_the_reference(trained, tmp_path, monkeypatch):
    run, image = trained
    ckpt = run / "checkpoints" / "last.pt"
    # A device that is "there" but breaks on load: it fails with the error, the CPU still runs
    # (first, as the reference, though not asked for), and the exit status is 1.
    loaded_on = []

    def load_detector(path, device):
        loaded_on.append(str(device))
        if device.type == "cuda":
            raise RuntimeError("CUDA error: no kernel image is available")
        return real_load(path, device)

    real_load = smoke.load_detector
    monkeypatch.setattr(smoke, "load_detector", load_detector)
    monkeypatch.setattr(smoke, "unavailable_reason", lambda name: None)
    out = tmp_path / "smoke.json"
    assert smoke_cli([str(ckpt), "--image", str(image), "--devices", "cuda:0", "--output-json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert loaded_on == ["cpu", "cuda:0"] and report["checkpoint"] == str(ckpt) and report["passed"] is False
    cpu, cuda = report["devices"]["cpu"], report["devices"]["cuda:0"]
    assert cpu["status"] == "pass" and "reference" in cpu["reason"] and cpu["detections"] >= 0
    assert cuda["status"] == "fail" and "no kernel image" in cuda["reason"] and cuda["detections"] is None


def test_bad_input_is_exit_status_2_with_the_file_and_the_fix(trained, tmp_path):
    run, image = trained
    out = tmp_path / "smoke.json"
    with pytest.raises(DetpactError) as missing_image:
        smoke_cli([str(run), "--image", str(tmp_path / "nope.jpg"), "--output-json", str(out)])
    assert missing_image.value.exit_code == 2
    assert "nope.jpg" in missing_image.value.message and "--image" in missing_image.value.message
    with pytest.raises(DetpactError) as missing_ckpt:
        smoke_cli([str(tmp_path / "gone.pt"), "--image", str(image), "--output-json", str(out)])
    assert "gone.pt" in missing_ckpt.value.message and "detpact train" in missing_ckpt.value.message
    with pytest.raises(DetpactError) as wrong_device:
        smoke_cli([str(run), "--image", str(image), "--devices", "cpu,gpu", "--output-json", str(out)])
    assert "'gpu'" in wrong_device.value.message and missing_ckpt.value.exit_code == wrong_device.value.exit_code == 2
    assert not out.exists()


def det(box: list[float], score: float, class_id: int = 0) -> dict:
    return {"box": box, "score": score, "class_id": class_id}


def test_detections_are_matched_by_class_and_best_iou():
    a = [det([0, 0, 10, 10], 0.9), det([20, 20, 40, 40], 0.8), det([50, 50, 60, 60], 0.7, class_id=1)]
    assert smoke.compare_detections(a, a) == {"max_box_diff": 0.0, "max_score_diff": 0.0, "unmatched": 0,
                                              "max_unmatched_score": 0.0}
    # Shuffled, nudged, and the third box of another class: matched by IoU, not by order.
    b = [det([20.5, 20, 40, 40], 0.79), det([0, 0, 10, 9.25], 0.905), det([50, 50, 60, 60], 0.7, class_id=2)]
    diff = smoke.compare_detections(a, b)
    assert diff == {"max_box_diff": 0.75, "max_score_diff": pytest.approx(0.01), "unmatched": 2,
                    "max_unmatched_score": 0.7}
    assert smoke.compare_detections([], b)["unmatched"] == 3 and smoke.compare_detections([], [])["unmatched"] == 0


def test_a_device_fails_beyond_the_tolerance_but_not_for_a_box_at_the_threshold():
    tolerance, threshold = {"box_px": 1.0, "score": 0.01}, 0.25
    reference = [det([0, 0, 10, 10], 0.9), det([30, 30, 40, 40], 0.255)]
    at_threshold = [det([0, 0, 10, 10.5], 0.9)]  # the 0.255 box fell under 0.25 here
    entry = {"status": "pass"}
    smoke._judge(entry, smoke.compare_detections(reference, at_threshold), tolerance, threshold)
    assert entry["status"] == "pass" and entry["unmatched"] == 1 and entry["max_box_diff"] == 0.5
    moved = [det([0, 0, 10, 12], 0.9), det([30, 30, 40, 40], 0.255)]
    entry = {"status": "pass"}
    smoke._judge(entry, smoke.compare_detections(reference, moved), tolerance, threshold)
    assert entry["status"] == "fail" and "2 px" in entry["reason"]
    missing = [det([30, 30, 40, 40], 0.255)]
    entry = {"status": "pass"}
    smoke._judge(entry, smoke.compare_detections(reference, missing), tolerance, threshold)
    assert entry["status"] == "fail" and "one device only" in entry["reason"]
