"""The YOLO reader: pixel boxes, and every defect a finding naming its file and line."""

from __future__ import annotations

import numpy as np
import pytest
from test_data import make_yolo  # tests/unit is on sys.path (rootdir-relative imports)

from detpact.data.formats import read_class_names, read_yolo, read_yolo_split, yolo_label_dir
from detpact.errors import DetpactError


def test_yolo_reader_converts_to_pixel_xyxy(tmp_path):
    root = make_yolo(tmp_path, {"a": "1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.1 0.2\n", "b": None, "c": ""})
    names = read_class_names(root, None)
    samples = read_yolo_split(root, "train", names)
    assert names == ["cat", "dog"] and [s.image_path.stem for s in samples] == ["a", "b", "c"]
    a = samples[0]
    assert (a.width, a.height) == (80, 60)
    np.testing.assert_allclose(a.boxes, [[20, 15, 60, 45], [16, 9, 24, 21]], atol=1e-4)
    assert a.labels.tolist() == [1, 0]
    assert len(samples[1].labels) == 0 and len(samples[2].labels) == 0  # background images


@pytest.mark.parametrize(
    ("line", "kind", "message"),
    [("2 0.5 0.5 0.1 0.1", "unknown_class", "class id 2 is not an integer in 0..1"),
     ("-1 0.5 0.5 0.1 0.1", "unknown_class", "class id -1 is not an integer in 0..1"),
     ("0.5 0.5 0.5 0.1 0.1", "unknown_class", "class id 0.5"),
     ("0 0.5 0.5 0.1", "bad_line", "expected 'class cx cy w h'"),
     ("0 0.5 0.5 zero 0.1", "bad_line", "expected 'class cx cy w h'"),
     ("0 0.5 0.5 0 0.1", "bad_box", "w, h > 0"),
     ("0 0.5 0.5 -0.2 0.1", "bad_box", "w, h > 0"),
     ("0 nan 0.5 0.1 0.1", "bad_box", "finite"),
     ("0 1.2 0.5 0.1 0.1", "bad_box", "outside the image"),
     ("0 0.98 0.5 0.1 0.1", "box_outside_image", "allowed -0.01..1.01"),
     ("0 0.5 0.5 0.2 0.2", "duplicate_box", "appears twice")],
)
def test_every_bad_label_line_is_a_finding_with_file_and_line(tmp_path, line, kind, message):
    root = make_yolo(tmp_path, {"a": f"0 0.5 0.5 0.2 0.2\n{line}\n", "b": "1 0.5 0.5 0.2 0.2\n"})
    result = read_yolo(root / "images" / "train", root / "labels" / "train", ["cat", "dog"])
    (finding,) = result.findings
    assert (finding.kind, finding.path.name, finding.where) == (kind, "a.txt", "line 2")
    assert message in finding.message and finding.image == root / "images" / "train" / "a.png"
    assert finding.severity == ("warning" if kind == "duplicate_box" else "error")
    # the good line is read either way; a clipped box stays, everything else is left out
    assert len(result.samples[0].labels) == (2 if kind == "box_outside_image" else 1)
    if kind == "box_outside_image":
        assert result.samples[0].boxes[1, 2] == 80  # clipped to the image width
    if finding.severity == "error":
        with pytest.raises(DetpactError, match="a.txt \\(line 2\\)"):
            read_yolo_split(root, "train", ["cat", "dog"])


def test_orphan_labels_unreadable_images_and_backgrounds(tmp_path):
    root = make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None, "c": "1 0.5 0.5 0.2 0.2\n"})
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "images" / "train" / "c.png").write_bytes(b"")  # an empty file with an image name
    result = read_yolo(root / "images" / "train", root / "labels" / "train", ["cat", "dog"])
    assert sorted((f.kind, f.path.name, f.severity) for f in result.findings) == [
        ("image_without_label", "b.png", "warning"), ("label_without_image", "ghost.txt", "error"),
        ("unreadable_image", "c.png", "error")]
    assert [s.image_path.name for s in result.samples] == ["a.png", "b.png"]


def test_image_list_file_and_label_folder_convention(tmp_path):
    root = make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n"})
    listing = root / "train.txt"
    listing.write_text("# one image per line\nimages/train/b.png\n")
    result = read_yolo(listing, yolo_label_dir(root / "images" / "train"), ["cat", "dog"])
    assert [s.image_path.name for s in result.samples] == ["b.png"] and result.findings == []
    assert yolo_label_dir(root / "images" / "train") == root / "labels" / "train"
    with pytest.raises(DetpactError, match="no 'images' folder"):
        yolo_label_dir(root / "pictures")


def test_missing_split_folder_and_class_names(tmp_path):
    root = make_yolo(tmp_path, {"a": ""})
    with pytest.raises(DetpactError, match="Image folder not found"):
        read_yolo_split(root, "test", ["cat", "dog"])
    (root / "classes.txt").unlink()
    with pytest.raises(DetpactError, match="set data.classes"):
        read_class_names(root, None)
