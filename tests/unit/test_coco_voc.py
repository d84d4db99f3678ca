"""COCO JSON and Pascal VOC XML readers: hand-written files with every defect kind, and
the real coco128 / raccoon annotations from ../shared/datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATASETS as SHARED
from detpact.data.coco_voc import read_coco, read_voc
from detpact.data.formats import read_yolo
from detpact.errors import DetpactError


def coco_file(tmp_path: Path, **changes) -> Path:
    data = {
        "images": [{"id": 7, "file_name": "b.jpg", "width": 100, "height": 50},
                   {"id": 3, "file_name": "a.jpg", "width": 200, "height": 100}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 5, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 90, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 5, "bbox": [10, 20, 30, 40], "iscrowd": 0},  # duplicate
            {"id": 4, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5]},  # unknown category
            {"id": 5, "image_id": 3, "category_id": 1, "bbox": [1, 1, 0, 5]},  # zero width
            {"id": 6, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
            {"id": 7, "image_id": 7, "category_id": 1, "bbox": [90, 40, 20, 20]},  # pokes out: clipped
            {"id": 8, "image_id": 7, "category_id": 1, "bbox": [200, 10, 5, 5]},  # entirely outside
        ],
    }
    data.update(changes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_maps_category_ids_keeps_crowd_as_ignore_and_reports_every_defect(tmp_path):
    result = read_coco(coco_file(tmp_path), tmp_path / "images")
    assert result.class_names == ["person", "bus", "toothbrush"]  # by ascending category id
    first, second = result.samples  # by ascending image id
    assert first.image_path == tmp_path / "images" / "a.jpg" and (first.width, first.height) == (200, 100)
    np.testing.assert_array_equal(first.boxes, [[10, 20, 40, 60], [0, 0, 50, 50]])
    assert first.labels.tolist() == [1, 2] and first.ignore.tolist() == [False, True]
    np.testing.assert_array_equal(second.boxes, [[90, 40, 100, 50]])
    kinds = sorted((f.kind, f.where) for f in result.findings)
    assert kinds == [("bad_box", "annotation id 5"), ("bad_box", "annotation id 8"),
                     ("box_outside_image", "annotation id 7"), ("duplicate_box", "image a.jpg"),
                     ("unknown_class", "annotation id 4"), ("unknown_image", "annotation id 6")]
    assert all(f.path.name == "instances.json" for f in result.findings)
    assert "category_id 2 is not in 'categories'" in str(next(f for f in result.findings if f.kind == "unknown_class"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"images": None}, "needs the lists images"),
    ({"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}, "two categories share an id"),
    ({"images": [{"id": 1, "file_name": "x.jpg"}]}, "needs id, file_name, width, height"),
])
def test_coco_structure_errors_name_the_file(tmp_path, changes, message):
    with pytest.raises(DetpactError, match=message) as err:
        read_coco(coco_file(tmp_path, **changes), tmp_path)
    assert "instances.json" in err.value.message


VOC = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJECT = "<object><name>{cls}</name><difficult>{difficult}</difficult>" \
         "<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"


def voc_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "xml"
    folder.mkdir()
    objects = [("dog", 0, (1, 1, 10, 20)), ("cat", 1, (5, 5, 50, 60)), ("dog", 0, (1, 1, 10, 20)),
               ("dog", 0, (30, 30, 20, 40)), ("dog", 0, (1, 1, "x", 4))]
    (folder / "one.xml").write_text(VOC.format(name="one", objects="".join(
        OBJECT.format(cls=c, difficult=d, box=b) for c, d, b in objects)))
    (folder / "two.xml").write_text(VOC.format(name="two", objects=OBJECT.format(cls="bird", difficult=0,
                                                                                box=(10, 10, 20, 20))))
    return folder


def test_voc_one_based_pixels_difficult_and_defects(tmp_path):
    folder = voc_folder(tmp_path)
    result = read_voc(folder, tmp_path / "images")
    assert result.class_names == ["bird", "cat", "dog"]
    one, two = result.samples
    assert one.image_path == tmp_path / "images" / "one.jpg" and (one.width, one.height) == (100, 80)
    np.testing.assert_array_equal(one.boxes, [[0, 0, 10, 20], [4, 4, 50, 60]])  # xmin 1 = the first column
    assert one.labels.tolist() == [2, 1] and one.ignore.tolist() == [False, True]
    assert sorted((f.kind, f.where) for f in result.findings) == [
        ("bad_box", "object 4"), ("bad_box", "object 5"), ("duplicate_box", None)]
    # With the class list given, other names are findings, not new classes.
    named = read_voc(folder, tmp_path, ["dog", "cat"])
    assert [f.kind for f in named.findings if f.kind == "unknown_class"] == ["unknown_class"]
    assert len(named.samples[1].labels) == 0


def test_voc_unreadable_file_names_it(tmp_path):
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "bad.xml").write_text("<annotation><filename>x.jpg</filename>")
    with pytest.raises(DetpactError, match="bad.xml is not readable Pascal VOC XML"):
        read_voc(folder, tmp_path)


@pytest.mark.skipif(not (SHARED / "coco128").is_dir(), reason="needs ../shared/datasets")
def test_coco128_json_agrees_with_its_yolo_labels():
    root = SHARED / "coco128"
    coco = read_coco(root / "annotations" / "instances_train2017.json", root / "images" / "train2017")
    assert (len(coco.samples), len(coco.class_names), coco.findings) == (128, 80, [])
    assert sum(int(s.ignore.sum()) for s in coco.samples if s.ignore is not None) == 10  # the crowd regions
    yolo_read = read_yolo(root / "images" / "train2017", root / "labels" / "train2017", coco.class_names)
    # the dataset's known quirks, and nothing else
    assert sorted((f.kind, f.path.name) for f in yolo_read.findings) == [
        ("image_without_label", "000000000250.jpg"), ("image_without_label", "000000000508.jpg"),
        ("label_without_image", "000000000656.txt"), ("label_without_image", "000000000659.txt")]
    yolo = {s.image_path.name: s for s in yolo_read.samples}
    for sample in coco.samples:
        theirs = yolo[sample.image_path.name]
        keep = ~sample.ignore if sample.ignore is not None else slice(None)
        ours = sample.boxes[keep]
        assert sample.labels[keep].tolist() == theirs.labels.tolist()
        np.testing.assert_allclose(ours, theirs.boxes, atol=1e-3 * max(sample.width, sample.height))


@pytest.mark.skipif(not (SHARED / "raccoon").is_dir(), reason="needs ../shared/datasets")
def test_raccoon_voc_reads_cleanly():
    root = SHARED / "raccoon"
    voc = read_voc(root / "annotations", root / "images")
    assert (len(voc.samples), voc.class_names, voc.findings) == (200, ["raccoon"], [])
    assert all(s.image_path.is_file() for s in voc.samples) and sum(len(s.labels) for s in voc.samples) == 217
