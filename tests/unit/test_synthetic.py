"""The built-in shapes dataset: deterministic, well-formed, honest labels, safe on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detpact.data import shapes, synthetic
from detpact.data.shapes import CLASS_NAMES, render_scene
from detpact.data.synthetic import ensure_synthetic, generate_synthetic
from detpact.errors import DetpactError

SPEC = dict(num_train=4, num_val=2, image_size=64, seed=7, max_objects=6)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_labels(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ----------------------------------------------------------------------------- content


def test_generation_is_byte_identical_and_seeded(tmp_path):
    generate_synthetic(tmp_path / "a", **SPEC)
    generate_synthetic(tmp_path / "b", **SPEC)
    generate_synthetic(tmp_path / "c", **{**SPEC, "seed": 8})
    a, b, c = (tree_digest(tmp_path / name) for name in "abc")
    expected = {f"images/train/{i:06d}.jpg" for i in range(4)} | {f"labels/val/{i:06d}.txt" for i in range(2)}
    assert expected <= set(a) and {"classes.txt", "synthetic.json"} <= set(a)
    assert len(a) == 2 * (4 + 2) + 2
    assert a == b
    assert all(a[f"images/train/{i:06d}.jpg"] != c[f"images/train/{i:06d}.jpg"] for i in range(4))


def test_image_depends_only_on_seed_split_and_index(tmp_path):
    generate_synthetic(tmp_path / "few", **{**SPEC, "num_train": 2, "num_val": 1})
    generate_synthetic(tmp_path / "many", **SPEC)
    few, many = tree_digest(tmp_path / "few"), tree_digest(tmp_path / "many")
    for rel in ("images/train/000000.jpg", "images/train/000001.jpg", "labels/train/000001.txt", "images/val/000000.jpg"):
        assert few[rel] == many[rel]
    assert many["images/train/000000.jpg"] != many["images/val/000000.jpg"]


def test_files_and_labels_are_well_formed(tmp_path):
    root = tmp_path / "shapes"
    generate_synthetic(root, num_train=12, num_val=3, image_size=80, seed=3, max_objects=8)
    assert (root / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    spec = json.loads((root / "synthetic.json").read_text())
    assert spec == dict(num_train=12, num_val=3, image_size=80, seed=3, max_objects=8,
                        generator_version=synthetic.GENERATOR_VERSION)
    seen_classes, counts = set(), []
    for split, n in (("train", 12), ("val", 3)):
        for i in range(n):
            with Image.open(root / "images" / split / f"{i:06d}.jpg") as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (80, 80))
            rows = read_labels(root / "labels" / split / f"{i:06d}.txt")
            assert 0 <= len(rows) <= 8
            counts.append(len(rows))
            for cls, *coords in rows:
                assert cls.isdigit() and 0 <= int(cls) < len(CLASS_NAMES)
                seen_classes.add(int(cls))
                assert all(len(c.split(".")[1]) == 6 for c in coords)
                cx, cy, w, h = map(float, coords)
                assert w > 0 and h > 0
                assert 0 <= cx - w / 2 + 1e-6 and cx + w / 2 - 1e-6 <= 1
                assert 0 <= cy - h / 2 + 1e-6 and cy + h / 2 - 1e-6 <= 1
                # 8% to 40% of the image, with an 8 px floor and rounding slack.
                assert 0.09 <= max(w, h) <= 0.41
    assert seen_classes == set(range(len(CLASS_NAMES)))
    assert max(counts) >= 4 and min(counts) >= 1


def test_label_files_hold_the_rendered_boxes(tmp_path):
    root = tmp_path / "shapes"
    generate_synthetic(root, **SPEC)
    for i in range(SPEC["num_val"]):
        scene = render_scene(np.random.default_rng([SPEC["seed"], 1, i]), image_size=64, max_objects=6)
        rows = np.array([[float(v) for v in row] for row in read_labels(root / f"labels/val/{i:06d}.txt")])
        assert rows.shape == (len(scene.classes), 5)
        assert (rows[:, 0] == scene.classes).all()
        x0, y0, x1, y1 = (scene.boxes / 64).T
        np.testing.assert_allclose(rows[:, 1:], np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1), atol=1e-6)


def test_boxes_tightly_enclose_the_drawn_pixels():
    ious = []
    for i in range(12):
        scene = render_scene(np.random.default_rng([11, 0, i]), image_size=128, max_objects=8)
        for k, box in enumerate(scene.boxes):
            ys, xs = np.nonzero(scene.owner == k)
            visible_box = (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
            # Every drawn pixel of the object lies inside its box (to within a pixel)...
            assert box[0] - 1 < visible_box[0] and visible_box[2] < box[2] + 1
            assert box[1] - 1 < visible_box[1] and visible_box[3] < box[3] + 1
            ious.append(iou(visible_box, box))
    # ...and the box is no bigger than what was drawn: thin star tips lose a pixel at most.
    assert min(ious) > 0.6 and np.median(ious) > 0.9


def test_objects_stand_out_from_the_background_in_the_jpeg(tmp_path):
    root = tmp_path / "shapes"
    generate_synthetic(root, num_train=12, num_val=0, image_size=96, seed=2, max_objects=6)
    distances = []
    for i in range(12):
        scene = render_scene(np.random.default_rng([2, 0, i]), image_size=96, max_objects=6)
        pixels = np.asarray(Image.open(root / f"images/train/{i:06d}.jpg"), dtype=np.float64)
        for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
            # Background in a 3 px ring just outside the box vs the object's own pixels.
            ring = np.zeros(scene.owner.shape, dtype=bool)
            ring[max(int(y0) - 3, 0): int(y1) + 4, max(int(x0) - 3, 0): int(x1) + 4] = True
            ring[int(y0): int(y1) + 1, int(x0): int(x1) + 1] = False
            ring &= scene.owner == -1
            inside = scene.owner == k
            if ring.sum() >= 20:
                distances.append(np.linalg.norm(pixels[inside].mean(0) - pixels[ring].mean(0)))
    # Colours are picked >= 100 RGB units from the background under the shape; the
    # ring is only nearby background, so allow some slack. Random colours give ~70.
    assert len(distances) >= 20
    assert np.percentile(distances, 10) > 85


def test_occlusion_happens_but_every_object_stays_mostly_visible():
    fractions = np.concatenate([
        render_scene(np.random.default_rng([5, 0, i]), image_size=64, max_objects=8).visible_fraction
        for i in range(40)
    ])
    assert fractions.min() >= shapes.MIN_VISIBLE
    assert (fractions < 0.95).sum() >= 5  # objects do overlap


# ----------------------------------------------------------------------------- on disk


def test_ensure_generates_then_reuses_without_touching(tmp_path, monkeypatch):
    root = tmp_path / "deep" / "er" / "shapes"
    assert ensure_synthetic(root, **SPEC) == root
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes"]  # no temp folder left
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a dataset that was already there")

    monkeypatch.setattr(synthetic, "generate_synthetic", must_not_run)
    assert ensure_synthetic(root, **SPEC) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_ensure_refuses_a_foreign_folder_and_leaves_it_alone(tmp_path):
    root = tmp_path / "my_data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "cat.jpg").write_bytes(b"not really a jpeg")
    (root / "notes.txt").write_text("precious")
    before = tree_digest(root)
    with pytest.raises(DetpactError) as info:
        ensure_synthetic(root, **SPEC)
    assert str(root) in info.value.message and "data.path" in info.value.message
    assert tree_digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_data"]


def test_ensure_accepts_an_empty_folder(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    ensure_synthetic(root, **SPEC)
    assert json.loads((root / "synthetic.json").read_text())["seed"] == SPEC["seed"]


def test_ensure_regenerates_its_own_dataset_when_the_spec_changes(tmp_path):
    root = tmp_path / "shapes"
    ensure_synthetic(root, **SPEC)
    old = tree_digest(root)
    ensure_synthetic(root, **{**SPEC, "seed": 99, "num_train": 3})
    new = tree_digest(root)
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 99
    assert "images/train/000003.jpg" not in new  # nothing of the old dataset survives
    assert new["images/train/000000.jpg"] != old["images/train/000000.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def test_failed_regeneration_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    ensure_synthetic(root, **SPEC)
    before = tree_digest(root)
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_scene(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, **{**SPEC, "seed": 1})
    assert tree_digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def test_bad_settings_and_nonempty_targets_are_user_errors(tmp_path):
    with pytest.raises(DetpactError, match="data.synthetic.image_size"):
        ensure_synthetic(tmp_path / "x", **{**SPEC, "image_size": 8})
    with pytest.raises(DetpactError, match="max_objects"):
        ensure_synthetic(tmp_path / "x", **{**SPEC, "max_objects": 0})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    with pytest.raises(DetpactError, match="not empty"):
        generate_synthetic(tmp_path / "full", **SPEC)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- domains


def scene_digest(domain: str | None) -> str:
    h = hashlib.sha256()
    for i in range(3):
        kwargs = {} if domain is None else {"domain": domain}
        scene = render_scene(np.random.default_rng([7, 0, i]), image_size=64, max_objects=6, **kwargs)
        for array in (scene.image, scene.classes, scene.boxes):
            h.update(array.tobytes())
    return h.hexdigest()


def test_the_plain_domain_is_the_dataset_as_it_was_before_domains(tmp_path):
    # Digest of these three scenes from the generator before `domain` existed (same
    # pixels, classes and boxes), and the cache folder key of the default config then:
    # sha256 of the synthetic settings' JSON without a domain key.
    before = "d03fc173750720dcc7474c7c776a597d0422aecff12bbafe6452d8a0b19ad81b"
    assert scene_digest(None) == scene_digest("plain") == before
    from detpact.config.data import DataConfig
    from detpact.data.build import _synthetic_key
    assert _synthetic_key(DataConfig(format="synthetic")) == "8f264ac5e608"
    assert _synthetic_key(DataConfig(format="synthetic", synthetic={"domain": "night"})) != "8f264ac5e608"
    generate_synthetic(tmp_path / "plain", **SPEC)
    spec = json.loads((tmp_path / "plain" / "synthetic.json").read_text())
    assert set(spec) == {"generator_version", "num_train", "num_val", "image_size", "seed", "max_objects"}


def test_night_is_the_same_scene_dimmer_bluer_and_noisier():
    for i in range(6):
        rng_args = [3, 0, i]
        plain = render_scene(np.random.default_rng(rng_args), image_size=96, max_objects=6)
        night = render_scene(np.random.default_rng(rng_args), image_size=96, max_objects=6, domain="night")
        np.testing.assert_array_equal(night.boxes, plain.boxes)  # same objects, same labels
        np.testing.assert_array_equal(night.classes, plain.classes)
        p, n = plain.image.astype(np.float64), night.image.astype(np.float64)
        assert n.mean() < 0.65 * p.mean()
        assert n[..., 2].mean() / n[..., 0].mean() > 1.1 * p[..., 2].mean() / p[..., 0].mean()
        # Pixel-to-pixel differences (mostly noise, on a smooth background) grow although
        # the contrast drops to about a third: sigma 10-18 instead of 2-9.
        rough_p, rough_n = np.abs(np.diff(p, axis=1)).mean(), np.abs(np.diff(n, axis=1)).mean()
        assert rough_n > 1.5 * rough_p


def test_clutter_adds_unlabelled_structure_and_keeps_the_labels_exact():
    def background_edges(domain: str) -> float:
        edges = []
        for i in range(8):
            scene = render_scene(np.random.default_rng([4, 0, i]), image_size=96, max_objects=4, domain=domain)
            if domain == "cluttered":  # distractors are under the objects, never over them
                for k, box in enumerate(scene.boxes):
                    ys, xs = np.nonzero(scene.owner == k)
                    assert box[0] - 1 < xs.min() and xs.max() + 1 < box[2] + 1
                    assert iou((xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0), box) > 0.6
            image = scene.image.astype(np.float64)
            step = np.abs(np.diff(image, axis=1)).max(axis=2)  # [S, S-1] largest channel jump
            background = (scene.owner[:, 1:] == -1) & (scene.owner[:, :-1] == -1)
            edges.append((step[background] > 60).mean())  # share of strong edges
        return float(np.mean(edges))

    plain, cluttered = background_edges("plain"), background_edges("cluttered")
    assert cluttered > 4 * plain and cluttered > 0.02


def test_domain_is_part_of_the_spec_and_checked(tmp_path):
    root = tmp_path / "shapes"
    ensure_synthetic(root, **SPEC)
    plain = tree_digest(root)
    ensure_synthetic(root, **SPEC, domain="night")  # a different dataset: regenerated
    night = tree_digest(root)
    assert json.loads((root / "synthetic.json").read_text())["domain"] == "night"
    assert night["labels/train/000001.txt"] == plain["labels/train/000001.txt"]
    assert night["images/train/000001.jpg"] != plain["images/train/000001.jpg"]
    with pytest.raises(DetpactError, match="data.synthetic.domain"):
        generate_synthetic(tmp_path / "x", **SPEC, domain="foggy")
