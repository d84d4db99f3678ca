"""`detpact data convert`: every direction on tiny hand-written datasets, the round-trip
precision (VOC -> COCO -> YOLO -> COCO keeps each box within 1e-6 relative), ignore boxes
reported, the refusals, and the real raccoon / coco128 data from ../shared/datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATASETS as SHARED
from detpact.data.build import read_dataset_yaml
from detpact.data.coco_voc import read_coco, read_voc
from detpact.data.convert import convert, format_summary
from detpact.data.formats import Annotations, read_yolo
from detpact.errors import DetpactError

VOC = "<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"
OBJECT = "<object><name>{cls}</name><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>" \
         "<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"


def image(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def voc_dataset(tmp_path: Path) -> Path:
    """a.jpg 64x48: a cat at non-integer 1-based pixels, a difficult dog, a dog on the
    whole image; b.png 50x40: a background image."""
    root = tmp_path / "voc"
    (root / "annotations").mkdir(parents=True)
    image(root / "images" / "a.jpg", (64, 48))
    image(root / "images" / "b.png", (50, 40))
    objects = [("cat", 0, (10.3, 5.7, 40.25, 30.125)), ("dog", 1, (3, 4, 20, 21)), ("dog", 0, (1, 1, 64, 48)),
               ("cat", 0, (33.33, 2.01, 61.7, 47.99))]
    (root / "annotations" / "a.xml").write_text(VOC.format(name="a.jpg", w=64, h=48, objects="".join(
        OBJECT.format(cls=c, difficult=d, box=b) for c, d, b in objects)))
    (root / "annotations" / "b.xml").write_text(VOC.format(name="b.png", w=50, h=40, objects=""))
    return root


def coco_dataset(tmp_path: Path, **changes) -> Path:
    """images/x.jpg 80x60 and images/sub/y.jpg 40x30; category ids 90/1/5 -> classes person, bus, toothbrush."""
    image(tmp_path / "coco" / "images" / "x.jpg", (80, 60))
    image(tmp_path / "coco" / "images" / "sub" / "y.jpg", (40, 30))
    data = {
        "images": [{"id": 4, "file_name": "sub/y.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "x.jpg", "width": 80, "height": 60}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "bus"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 5, "bbox": [10.25, 20.5, 30.125, 12.75]},
                        {"id": 2, "image_id": 2, "category_id": 90, "bbox": [0, 0, 80, 60], "iscrowd": 1},
                        {"id": 3, "image_id": 4, "category_id": 1, "bbox": [1.1, 2.2, 3.3, 4.4]}],
    }
    data.update(changes)
    path = tmp_path / "coco" / "annotations" / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def by_name(annotations: Annotations) -> dict:
    return {s.image_path.name: s for s in annotations.samples}


def kept(sample) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and labels without the ignore regions."""
    keep = ~sample.ignore if sample.ignore is not None else np.ones(len(sample.labels), dtype=bool)
    return sample.boxes[keep], sample.labels[keep]


def max_relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    assert np.all(ours[reference == 0] == 0)  # a coordinate 0 must stay exactly 0
    nonzero = reference != 0
    return float(np.max(np.abs(ours - reference)[nonzero] / np.abs(reference[nonzero]), initial=0.0))


def test_voc_to_coco_to_yolo_to_coco_keeps_every_box_and_reports_ignore(tmp_path):
    src = voc_dataset(tmp_path)
    before = tree(src)
    first = convert("voc", "coco", src, tmp_path / "c1")
    coco_json = tmp_path / "c1" / "annotations" / "instances.json"
    written = json.loads(coco_json.read_text())
    assert [c["name"] for c in written["categories"]] == ["cat", "dog"] and written["categories"][0]["id"] == 1
    assert [a["iscrowd"] for a in written["annotations"]] == [0, 1, 0, 0]  # difficult -> crowd
    assert written["annotations"][0]["bbox"] == [9.300000190734863, 4.699999809265137, 30.949999809265137,
                                                 25.425000190734863]  # float32 boxes, unrounded
    assert first["images"] == 2 and first["boxes"] == 4

    second = convert("coco", "yolo", coco_json, tmp_path / "y")  # image root found at ../images
    assert (second["boxes"], second["ignored_left_out"]) == (3, 1)
    assert "left out 1 ignore boxes" in format_summary(second)
    assert (tmp_path / "y" / "labels" / "b.txt").read_text() == ""  # background image: an empty label file
    convert("yolo", "coco", tmp_path / "y", tmp_path / "c2")

    voc = by_name(read_voc(src / "annotations", src / "images"))
    final = by_name(read_coco(tmp_path / "c2" / "annotations" / "instances.json", tmp_path / "c2" / "images"))
    assert sorted(final) == ["a.jpg", "b.png"]
    worst = 0.0
    for name, sample in final.items():
        boxes, labels = kept(voc[name])
        assert (sample.width, sample.height) == (voc[name].width, voc[name].height)
        assert sample.labels.tolist() == labels.tolist() and sample.ignore is None
        worst = max(worst, max_relative_error(sample.boxes, boxes))
    assert worst <= 1e-6, worst
    assert tree(src) == before  # SRC untouched


def test_coco_to_yolo_links_the_originals_and_reads_back(tmp_path):
    src = coco_dataset(tmp_path)
    summary = convert("coco", "yolo", src, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["class_names"] == ["person", "bus", "toothbrush"]
    assert (out / "classes.txt").read_text() == "person\nbus\ntoothbrush\n"
    lines = (out / "labels" / "x.txt").read_text().splitlines()
    assert lines == [f"1 0.31640625 {26.875 / 60!r} 0.3765625 0.2125"]  # the crowd box is left out, and counted:
    assert summary["ignored_left_out"] == 1 and summary["splits"][""]["ignored_left_out"] == 1
    link = out / "images" / "sub" / "y.jpg"  # the folder structure below the common image folder is kept
    assert link.is_symlink() and link.resolve() == (tmp_path / "coco" / "images" / "sub" / "y.jpg").resolve()
    assert not any(p.is_file() and not p.is_symlink() for p in (out / "images").rglob("*"))  # nothing copied

    root, splits, names = read_dataset_yaml(out / "dataset.yaml")
    assert root == out.resolve() and names == ["person", "bus", "toothbrush"] and list(splits) == ["train"]
    back = read_yolo(root / splits["train"].images, root / "labels", names)
    assert back.findings == []
    coco = by_name(read_coco(src, tmp_path / "coco" / "images"))
    for name, sample in by_name(back).items():
        boxes, labels = kept(coco[name])
        assert sample.labels.tolist() == labels.tolist()
        assert max_relative_error(sample.boxes, boxes) <= 1e-6

    # images/ holding images and a subfolder is one split, not a split "sub"; links point at the originals
    again = convert("yolo", "coco", out, tmp_path / "again")
    assert list(again["splits"]) == [""] and again["images"] == 2
    assert os.readlink(tmp_path / "again" / "images" / "sub" / "y.jpg") == str(link.resolve())


@pytest.mark.parametrize("target", ["yolo", "coco"])
def test_copy_images_copies(tmp_path, target):
    src = coco_dataset(tmp_path)
    summary = convert("coco", target, src, tmp_path / "out", copy_images=True)
    copied = tmp_path / "out" / "images" / "x.jpg"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (tmp_path / "coco" / "images" / "x.jpg").read_bytes()
    assert "(copied)" in format_summary(summary)


def yolo_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    image(root / "images" / "train" / "p.jpg", (100, 50))
    image(root / "images" / "val" / "q.jpg", (30, 60))
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "p.txt").write_text("0 0.123456789 0.5 0.2 0.3\n1 0.5 0.5 1 1\n")
    (root / "labels" / "val" / "q.txt").write_text("1 0.33333333333333331 0.25 0.1 0.1\n")
    (root / "classes.txt").write_text("ant\nbee\n")
    return root


def test_yolo_splits_to_coco_one_json_per_split(tmp_path):
    src = yolo_dataset(tmp_path)
    summary = convert("yolo", "coco", src, tmp_path / "out")
    assert sorted(summary["splits"]) == ["train", "val"] and summary["boxes"] == 3
    for split in ("train", "val"):
        coco = read_coco(tmp_path / "out" / "annotations" / f"instances_{split}.json",
                         tmp_path / "out" / "images" / split)
        yolo = read_yolo(src / "images" / split, src / "labels" / split, ["ant", "bee"])
        assert coco.class_names == ["ant", "bee"] and coco.findings == []
        (ours,), (theirs,) = coco.samples, yolo.samples
        assert ours.labels.tolist() == theirs.labels.tolist()
        assert max_relative_error(ours.boxes, theirs.boxes) <= 1e-6

    # YOLO -> COCO -> YOLO: the boxes detpact reads are the same
    convert("coco", "yolo", tmp_path / "out" / "annotations" / "instances_train.json", tmp_path / "back")
    (ours,) = read_yolo(tmp_path / "back" / "images", tmp_path / "back" / "labels", ["ant", "bee"]).samples
    (theirs,) = read_yolo(src / "images" / "train", src / "labels" / "train", ["ant", "bee"]).samples
    assert ours.labels.tolist() == theirs.labels.tolist()
    assert max_relative_error(ours.boxes, theirs.boxes) <= 1e-6

    # from the dataset YAML of a YOLO output, to YOLO again
    convert("yolo", "yolo", src, tmp_path / "y1")
    assert "val: images/val" in (tmp_path / "y1" / "dataset.yaml").read_text()
    again = convert("yolo", "yolo", tmp_path / "y1" / "dataset.yaml", tmp_path / "y2", classes=["A", "B"])
    assert again["class_names"] == ["A", "B"] and again["boxes"] == 3
    assert (tmp_path / "y2" / "images" / "train" / "p.jpg").resolve() == (src / "images" / "train" / "p.jpg")


def test_voc_xml_folder_with_images_option(tmp_path):
    src = voc_dataset(tmp_path)
    summary = convert("voc", "yolo", src / "annotations", tmp_path / "out", images=src / "images",
                      classes=["dog", "cat"])
    assert summary["class_names"] == ["dog", "cat"]
    assert [line.split()[0] for line in (tmp_path / "out" / "labels" / "a.txt").read_text().splitlines()] == \
        ["1", "0", "1"]


def test_error_findings_refuse_unless_forced(tmp_path):
    bad = [{"id": 1, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]},
           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    src = coco_dataset(tmp_path, annotations=bad)
    with pytest.raises(DetpactError, match="unknown_class") as err:
        convert("coco", "yolo", src, tmp_path / "out")
    assert "instances.json" in err.value.message and "--force" in err.value.message
    assert not (tmp_path / "out").exists()
    summary = convert("coco", "yolo", src, tmp_path / "out", force=True)
    assert summary["boxes"] == 1 and summary["findings"]["errors"] == 1
    assert summary["forced_errors"][0].startswith("[unknown_class]") and "--force" in format_summary(summary)


def test_missing_and_mis_sized_images_are_errors(tmp_path):
    src = voc_dataset(tmp_path)
    (src / "images" / "b.png").unlink()
    image(src / "images" / "a.jpg", (48, 64))
    with pytest.raises(DetpactError) as err:
        convert("voc", "coco", src, tmp_path / "out")
    assert "[missing_image]" in err.value.message and "[size_mismatch]" in err.value.message
    summary = convert("voc", "coco", src, tmp_path / "out", force=True)
    assert summary["images"] == 1 and summary["skipped_images"] == [str(src / "images" / "b.png")]


def test_out_must_be_new_or_empty_and_outside_the_source(tmp_path):
    src = voc_dataset(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DetpactError, match="is not an empty folder"):
        convert("voc", "yolo", src, tmp_path / "full")
    with pytest.raises(DetpactError, match="overlaps the source folder"):
        convert("voc", "yolo", src, src / "images" / ".." / "converted")
    (tmp_path / "empty").mkdir()
    convert("voc", "yolo", src, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "dataset.yaml").is_file()


def test_a_failed_conversion_leaves_no_output(tmp_path):
    src = coco_dataset(tmp_path)
    image(tmp_path / "coco" / "images" / "x.png", (80, 60))
    data = json.loads(src.read_text())
    data["images"].append({"id": 9, "file_name": "x.png", "width": 80, "height": 60})
    src.write_text(json.dumps(data))
    with pytest.raises(DetpactError, match="would share the output name x"):
        convert("coco", "yolo", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (SHARED / "raccoon").is_dir(), reason="needs ../shared/datasets")
def test_raccoon_voc_coco_yolo_coco_round_trip(tmp_path):
    root = SHARED / "raccoon"
    convert("voc", "coco", root, tmp_path / "c1")
    convert("coco", "yolo", tmp_path / "c1" / "annotations" / "instances.json", tmp_path / "y")
    summary = convert("yolo", "coco", tmp_path / "y" / "dataset.yaml", tmp_path / "c2")
    assert (summary["images"], summary["boxes"]) == (200, 217)
    voc = by_name(read_voc(root / "annotations", root / "images"))
    final = read_coco(tmp_path / "c2" / "annotations" / "instances_train.json", tmp_path / "c2" / "images" / "train")
    assert final.findings == []
    for sample in final.samples:
        reference = voc[sample.image_path.name]
        assert sample.labels.tolist() == reference.labels.tolist()
        assert max_relative_error(sample.boxes, reference.boxes) <= 1e-6


@pytest.mark.skipif(not (SHARED / "coco128").is_dir(), reason="needs ../shared/datasets")
def test_coco128_json_to_yolo_matches_its_own_yolo_labels(tmp_path):
    root = SHARED / "coco128"
    summary = convert("coco", "yolo", root / "annotations" / "instances_train2017.json", tmp_path / "out")
    assert (summary["images"], summary["ignored_left_out"]) == (128, 10)  # images found at images/train2017
    ours = read_yolo(tmp_path / "out" / "images", tmp_path / "out" / "labels", summary["class_names"])
    theirs = by_name(read_yolo(root / "images" / "train2017", root / "labels" / "train2017", summary["class_names"]))
    assert ours.findings == []
    for sample in ours.samples:
        reference = theirs[sample.image_path.name]
        assert sample.labels.tolist() == reference.labels.tolist()
        # coco128's labels have 6 significant digits: within 1e-6 of the image size
        np.testing.assert_allclose(sample.boxes, reference.boxes, rtol=0,
                                   atol=1e-6 * max(sample.width, sample.height))
        assert os.path.samefile(sample.image_path, reference.image_path)
