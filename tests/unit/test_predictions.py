"""The predictions file: schema version 1, the accepted forms, box layouts, every problem
named with its entry and field, and the round trip through COCO results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATASETS
from detpact.errors import DetpactError
from detpact.inference.predictions import (
    from_coco_results,
    read_predictions,
    to_coco_results,
    to_xyxy,
    write_predictions,
)

ENTRY = {"image": "a/cat.jpg", "width": 100, "height": 50,
         "detections": [{"box": [10.0, 5.0, 30.0, 25.0], "score": 0.9, "class_id": 1, "class_name": "cat"}]}


def write(tmp_path: Path, document) -> Path:
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(document))
    return path


def test_version_1_round_trip_and_every_accepted_form(tmp_path):
    write_predictions(tmp_path / "v1.json", [ENTRY], {"backend": "torch"})
    images, meta = read_predictions(tmp_path / "v1.json")
    assert meta == {"backend": "torch"} and images[0].detections[0].box == (10.0, 5.0, 30.0, 25.0)
    for document in ([ENTRY], {"predictions": [ENTRY], "meta": {"x": 1}},
                     {"class_names": ["a"], "images": [{**ENTRY, "detections": [
                         {**ENTRY["detections"][0], "box_xyxy": ENTRY["detections"][0]["box"], "box": None}]}]}):
        if "images" in document:  # a file written before version 1: box_xyxy, no "box"
            document["images"][0]["detections"][0].pop("box")
        images, _ = read_predictions(write(tmp_path, document))
        assert images[0].detections[0].box == (10.0, 5.0, 30.0, 25.0) and images[0].image == "a/cat.jpg"


@pytest.mark.parametrize(("fmt", "box"), [("xywh", [10, 5, 20, 20]), ("cxcywh", [20, 15, 20, 20]),
                                           ("cxcywh_norm", [0.2, 0.3, 0.2, 0.4])])
def test_box_layouts_on_import(tmp_path, fmt, box):
    assert to_xyxy(box, fmt, 100, 50) == pytest.approx([10, 5, 30, 25])
    entry = {**ENTRY, "detections": [{**ENTRY["detections"][0], "box": box}]}
    images, _ = read_predictions(write(tmp_path, [entry]), bbox_format=fmt)
    assert images[0].detections[0].box == pytest.approx((10, 5, 30, 25))


def test_every_problem_is_named_with_its_entry_and_field(tmp_path):
    bad = [ENTRY,
           {**ENTRY, "detections": [{**ENTRY["detections"][0], "score": 1.5}]},
           {**ENTRY, "width": 0},
           {**ENTRY, "detections": [{**ENTRY["detections"][0], "box": [30, 5, 10, 25]}]},
           {"width": 10, "height": 10, "detections": []},
           {**ENTRY, "detections": [{"box": [1, 2, 3], "score": 0.5, "class_id": -1}]}]
    with pytest.raises(DetpactError) as caught:
        read_predictions(write(tmp_path, {"predictions": bad}))
    message = caught.value.message
    assert "predictions[0]" not in message
    for expected in ("predictions[1].detections[0].score", "predictions[2].width", "predictions[3].detections: ",
                     "x2 < x1", "predictions[4]: names no image", "predictions[5].detections[0].box",
                     "predictions[5].detections[0].class_id"):
        assert expected in message, (expected, message)


def test_unreadable_and_future_files_are_refused(tmp_path):
    (tmp_path / "truncated.json").write_text("{")
    with pytest.raises(DetpactError, match="not valid JSON"):
        read_predictions(tmp_path / "truncated.json")
    with pytest.raises(DetpactError, match="version 2 is not one this detpact reads"):
        read_predictions(write(tmp_path, {"schema": "detpact.predictions", "version": 2, "predictions": []}))
    with pytest.raises(DetpactError, match="not found"):
        read_predictions(tmp_path / "missing.json")
    with pytest.raises(DetpactError, match="--bbox-format"):
        read_predictions(write(tmp_path, []), bbox_format="yxyx")


def test_coco_results_round_trip_on_the_fixture(tmp_path):
    fixture = SHARED_DATASETS / "coco_eval_fixtures" / "fce_small"
    gt = json.loads((fixture / "gt_dataset.json").read_text())
    results = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")}
               for r in json.loads((fixture / "dt_dataset.json").read_text())]
    entries = from_coco_results(results, gt)
    write_predictions(tmp_path / "p.json", entries, {})
    images, _ = read_predictions(tmp_path / "p.json")
    assert len(images) == len(gt["images"]) and sum(len(i.detections) for i in images) == len(results)
    categories = [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    back = to_coco_results(images, {}, categories)
    key = lambda r: (r["image_id"], r["category_id"], r["score"])  # noqa: E731
    for ours, theirs in zip(sorted(back, key=key), sorted(results, key=key)):
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-9) and ours["score"] == theirs["score"]
    with pytest.raises(DetpactError, match="image_id 999 is not in the ground-truth"):
        from_coco_results([{**results[0], "image_id": 999}], gt)
