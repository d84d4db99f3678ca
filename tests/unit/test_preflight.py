"""Preflight (image checks, report, cache, on_error), splits (val_ratio, stratification,
manifest) and the Ultralytics dataset YAML, on tiny datasets written by the tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_data import make_yolo  # tests/unit is on sys.path (rootdir-relative imports)

from detpact.config import DataConfig
from detpact.data import preflight as preflight_module
from detpact.data.build import build_datasets, read_sources
from detpact.data.formats import open_rgb
from detpact.data.preflight import run_preflight
from detpact.data.split import box_bucket, resolve_split, split_by_ratio
from detpact.errors import DetpactError

NAMES = ["cat", "dog"]


def write_jpeg(path: Path, size=(80, 60), orientation: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = image.getexif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90, exif=exif)
    return path


def yolo_config(root: Path, **changes) -> DataConfig:
    return DataConfig(format="yolo", path=str(root), classes=NAMES, **changes)


def test_preflight_decodes_every_image_and_never_touches_the_files(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "0 0.5 0.5 0.2 0.2\n",
                                       "c": "1 0.5 0.5 0.2 0.2\n", "d": "1 0.5 0.5 0.2 0.2\n"})
    train = root / "images" / "train"
    good = write_jpeg(train / "e.jpg")
    truncated = train / "t.jpg"
    truncated.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])  # header intact, data cut
    (train / "a.png").write_bytes(b"")  # an empty file named like an image
    (train / "b.png").write_text("not an image at all")
    write_jpeg(train / "r.jpg", size=(80, 60), orientation=6)  # shown upright as 60x80
    (root / "labels" / "train" / "r.txt").write_text("0 0.5 0.5 0.5 0.2\n")  # in the upright frame
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in train.iterdir()}

    sources = read_sources(yolo_config(root), tmp_path / "cache")
    report = run_preflight(sources.root, "yolo", sources.splits, tmp_path / "cache")

    found = {(f.kind, report.relative(f.path)) for f in report.errors}
    assert found == {("unreadable_image", "images/train/a.png"), ("unreadable_image", "images/train/b.png"),
                     ("unreadable_image", "images/train/t.jpg")}
    truncation = next(f for f in report.errors if f.path.name == "t.jpg")
    assert "truncated" in truncation.message
    assert report.splits["train"].exif_rotated == 1 and report.splits["train"].backgrounds == 2  # e, t
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in train.iterdir()} == before  # never rewritten
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    # the rotated image is read upright everywhere: sizes, labels and pixels agree
    rotated = next(s for s in sources.splits["train"].samples if s.image_path.name == "r.jpg")
    assert (rotated.width, rotated.height) == (60, 80) == open_rgb(rotated.image_path).size
    np.testing.assert_allclose(rotated.boxes, [[15, 32, 45, 48]], atol=1e-4)


def test_size_mismatch_names_the_exif_rotation(tmp_path):
    write_jpeg(tmp_path / "images" / "r.jpg", size=(80, 60), orientation=6)
    write_jpeg(tmp_path / "images" / "s.jpg", size=(80, 60))
    (tmp_path / "xml").mkdir()
    for stem, (w, h) in (("r", (80, 60)), ("s", (90, 60))):  # r: the raw frame's size; s: simply wrong
        (tmp_path / "xml" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height></size>"
            "<object><name>cat</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
            "</object></annotation>")
    cfg = DataConfig(format="voc", path=str(tmp_path), train={"images": "images", "annotations": "xml"},
                     val={"images": "images", "annotations": "xml"})
    with pytest.raises(DetpactError, match="size_mismatch") as err:
        build_datasets(cfg, tmp_path / "cache")
    assert "r.jpg" in err.value.message and "EXIF orientation 6" in err.value.message
    assert "s.jpg" in err.value.message and "says 90x60 but the upright image is 80x60" in err.value.message


def test_missing_annotated_image_and_counts_in_json(tmp_path):
    write_jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 80, "height": 60},
                   {"id": 2, "file_name": "gone.jpg", "width": 80, "height": 60}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]},
                        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]}],
        "categories": [{"id": 3, "name": "cat"}]}))
    cfg = DataConfig(format="coco", path=str(tmp_path), train={"images": "images", "annotations": "ann.json"},
                     val_ratio=0.5)
    sources = read_sources(cfg, tmp_path / "cache")
    report = run_preflight(sources.root, "coco", sources.splits)
    data = report.to_json()
    assert data["counts"] == {"errors": 1, "warnings": 1, "by_kind": {"duplicate_box": 1, "missing_image": 1}}
    assert [(f["kind"], f["file"]) for f in data["findings"]] == [("missing_image", "images/gone.jpg"),
                                                                  ("duplicate_box", "ann.json")]
    assert data["splits"]["train"] == {"images": 2, "boxes": 1, "ignored_boxes": 0, "backgrounds": 1,
                                       "exif_rotated": 0}


def test_report_is_identical_across_runs_and_cached(tmp_path, monkeypatch):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n", "b": None})
    sources = read_sources(yolo_config(root), tmp_path / "cache")
    first = run_preflight(sources.root, "yolo", sources.splits, tmp_path / "cache").to_json()
    assert first["counts"]["by_kind"] == {"duplicate_box": 2, "image_without_label": 2}  # train and val copies
    monkeypatch.setattr(preflight_module, "check_image", lambda path: pytest.fail("decoded again"))
    again = run_preflight(sources.root, "yolo", read_sources(yolo_config(root), tmp_path / "cache").splits,
                          tmp_path / "cache").to_json()
    assert again == first
    (root / "images" / "train" / "a.png").touch()  # a new modification time: checked again
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        run_preflight(sources.root, "yolo", sources.splits, tmp_path / "cache")


def test_on_error_fail_lists_every_error_and_skip_drops_the_images(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "5 0.5 0.5 0.2 0.2\n",
                                       "c": "0 0.5 0.5 0 0.2\n", "d": "1 0.5 0.5 0.2 0.2\n"})
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DetpactError) as err:
        build_datasets(yolo_config(root), tmp_path / "cache")
    message = err.value.message
    assert "5 errors" in message and "data.on_error: skip" in message
    for fragment in ("b.txt (line 1)", "c.txt (line 1)", "ghost.txt", "unknown_class", "bad_box",
                     "label_without_image"):
        assert fragment in message
    data = build_datasets(yolo_config(root, on_error="skip"), tmp_path / "cache")
    assert [s.image_path.stem for s in data.train] == ["a", "d"]  # b and c dropped, in train and val
    assert data.skipped == [{"file": "images/train/b.png", "image": True, "reasons": ["unknown_class"]},
                            {"file": "images/train/c.png", "image": True, "reasons": ["bad_box"]},
                            {"file": "images/val/b.png", "image": True, "reasons": ["unknown_class"]},
                            {"file": "images/val/c.png", "image": True, "reasons": ["bad_box"]},
                            {"file": "labels/train/ghost.txt", "image": False, "reasons": ["label_without_image"]}]
    assert data.summary()["skipped"]["images"] == 4 and data.summary()["preflight"]["errors"] == 5


def test_empty_split_is_an_error_before_training(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"})
    for folder in ("images", "labels"):
        for file in (root / folder / "val").iterdir():
            file.unlink()
    with pytest.raises(DetpactError, match="The val split of .* has no usable image"):
        build_datasets(yolo_config(root), tmp_path / "cache")


# --- splits --------------------------------------------------------------------------


def many(tmp_path: Path, counts: list[int]):
    """A YOLO train folder whose image i has counts[i] boxes."""
    labels = {f"im{i:03d}": "".join(f"0 0.{j + 1} 0.5 0.05 0.05\n" for j in range(n)) for i, n in enumerate(counts)}
    root = make_yolo(tmp_path / "ds", labels, size=(16, 16))
    return root, read_sources(yolo_config(root, val_ratio=0.25), tmp_path / "cache").splits["train"].samples


def test_split_is_a_pure_function_of_seed_and_stratifies(tmp_path):
    root, samples = many(tmp_path, [0] * 20 + [1] * 40 + [3] * 20)
    first = split_by_ratio(samples, 0.25, seed=3, stratify=True)
    assert split_by_ratio(samples, 0.25, seed=3, stratify=True) == first
    assert split_by_ratio(samples, 0.25, seed=4, stratify=True) != first
    train, val = first
    assert sorted(train + val) == list(range(80)) and len(val) == 20
    assert [sum(box_bucket(samples[i]) == b for i in val) for b in range(3)] == [5, 10, 5]  # 25 % of each bucket
    plain = split_by_ratio(samples, 0.25, seed=3, stratify=False)[1]
    assert len(plain) == 20 and plain != val


def test_split_manifest_written_reused_and_checked(tmp_path):
    root, samples = many(tmp_path, [1] * 12)
    manifest = tmp_path / "splits" / "m.json"
    train, val, info = resolve_split(samples, root, 0.25, 0, False, manifest)
    assert info["source"] == "written" and len(val) == 3
    recorded = json.loads(manifest.read_text())
    assert recorded["val"] == [f"images/train/im{i:03d}.png" for i in val]
    # a hand-edited manifest is what later runs use
    recorded["val"], recorded["train"] = recorded["train"][:2], recorded["train"][2:] + recorded["val"]
    manifest.write_text(json.dumps(recorded))
    train2, val2, info2 = resolve_split(samples, root, 0.25, 0, False, manifest)
    assert info2["source"] == "manifest" and [samples[i].image_path.name for i in val2] == \
        [Path(p).name for p in recorded["val"]]
    with pytest.raises(DetpactError, match="written with .* but the config asks for"):
        resolve_split(samples, root, 0.3, 0, False, manifest)
    with pytest.raises(DetpactError, match="1 dataset images are not listed"):
        resolve_split(samples + [samples[0].__class__(root / "images/train/new.png", 16, 16, samples[0].boxes,
                                                     samples[0].labels)], root, 0.25, 0, False, manifest)


def test_val_ratio_through_build_datasets_uses_the_manifest(tmp_path):
    root, _ = many(tmp_path, [1] * 10 + [0] * 2)
    cfg = yolo_config(root, val_ratio=0.25, split_manifest=str(tmp_path / "m.json"), stratify=True)
    first = build_datasets(cfg, tmp_path / "cache")
    assert (len(first.train), len(first.val), first.split["source"]) == (9, 3, "written")
    again = build_datasets(cfg, tmp_path / "cache")
    assert again.split["source"] == "manifest" and again.fingerprint == first.fingerprint


# --- Ultralytics dataset YAML --------------------------------------------------------


def test_dataset_yaml_is_read_and_download_scripts_are_refused(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "1 0.5 0.5 0.2 0.2\n"})
    spec = root / "data.yaml"
    spec.write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    data = build_datasets(DataConfig(format="yolo", path=str(spec)), tmp_path / "cache")
    assert data.class_names == NAMES and len(data.train) == len(data.val) == 1
    sentinel = tmp_path / "executed"
    for key in (f"download: \"python -c 'open(\\\"{sentinel}\\\", \\\"w\\\")'\"", f"download: bash touch {sentinel}"):
        spec.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n{key}\n")
        with pytest.raises(DetpactError, match="keys detpact does not read: download"):
            build_datasets(DataConfig(format="yolo", path=str(spec)), tmp_path / "cache")
    assert not sentinel.exists()
    spec.write_text("path: .\ntrain: ../../etc\nval: images/val\nnames: [cat, dog]\n")
    with pytest.raises(DetpactError, match="inside the dataset folder"):
        build_datasets(DataConfig(format="yolo", path=str(spec)), tmp_path / "cache")
