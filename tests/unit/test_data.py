"""YOLO reading, transforms, sampler and loader determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detpact.config import AugmentConfig, DataConfig
from detpact.data.build import build_datasets
from detpact.data.dataset import DetectionDataset, collate
from detpact.data.formats import Sample, read_yolo_split
from detpact.data.sampler import ResumableSampler
from detpact.data.transforms import hflip, letterbox, letterbox_boxes
from detpact.errors import DetpactError


def make_yolo(root: Path, labels: dict[str, str], size=(80, 60)) -> Path:
    """A tiny YOLO dataset: one image per label entry (None = no label file)."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, text in labels.items():
            rng = np.random.default_rng(len(stem))
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / split / f"{stem}.png")
            if text is not None:
                (root / "labels" / split / f"{stem}.txt").write_text(text)
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


def test_missing_dataset_never_falls_back_to_synthetic(tmp_path):
    cfg = DataConfig(format="yolo", path=str(tmp_path / "nowhere"))
    with pytest.raises(DetpactError, match="Dataset folder not found") as err:
        build_datasets(cfg, tmp_path / "cache")
    assert "nowhere" in err.value.message
    assert not (tmp_path / "cache").exists()  # nothing was generated instead


def test_fingerprint_tracks_labels(tmp_path):
    root = make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    cfg = DataConfig(format="yolo", path=str(root))
    first = build_datasets(cfg, tmp_path).fingerprint
    assert build_datasets(cfg, tmp_path).fingerprint == first
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    assert build_datasets(cfg, tmp_path).fingerprint != first


def test_letterbox_round_trip_and_flip():
    image = Image.fromarray(np.zeros((60, 120, 3), np.uint8))
    canvas, placement = letterbox(image, 64)
    assert canvas.shape == (64, 64, 3) and placement.scale == pytest.approx(64 / 120)
    assert (placement.pad_x, placement.pad_y) == (0, 16)
    assert canvas[0, 0, 0] == 114 and canvas[32, 32, 0] == 0  # padding grey, image black
    boxes = np.array([[10.0, 5.0, 50.0, 40.0]], np.float32)
    on_canvas = letterbox_boxes(boxes, placement)
    np.testing.assert_allclose(placement.to_original(on_canvas, 120, 60), boxes, atol=1e-4)
    flipped_img, flipped = hflip(canvas, on_canvas)
    assert np.array_equal(hflip(flipped_img, flipped)[0], canvas)
    np.testing.assert_allclose(hflip(flipped_img, flipped)[1], on_canvas, atol=1e-4)


def test_sampler_order_is_pure_and_resumable():
    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(i for _, i in full) == list(range(10)) and all(e == 2 for e, _ in full)
    assert list(ResumableSampler(10, seed=3).order(2)) == [i for _, i in full]  # pure in (seed, epoch)
    assert list(sampler.order(3)) != list(sampler.order(2))
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6


# Flips only (the rest of the pipeline is tested in test_augment.py).
FLIP_ONLY = AugmentConfig(mosaic_p=0.0, scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, hflip_p=0.5)


def flip_dataset(tmp_path):
    root = make_yolo(tmp_path, {f"im{i}": "0 0.3 0.5 0.2 0.4\n" for i in range(6)})
    samples = read_yolo_split(root, "train", ["cat", "dog"])
    return DetectionDataset(samples, 64, train=True, seed=7, augment=FLIP_ONLY)


def test_samples_are_a_function_of_seed_epoch_index(tmp_path):
    ds = flip_dataset(tmp_path)
    again = DetectionDataset(ds.samples, 64, train=True, seed=7, augment=FLIP_ONLY)
    flips = []
    for epoch in range(4):
        for index in range(len(ds)):
            image, target = ds[(epoch, index)]
            image2, target2 = again[(epoch, index)]
            assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
            flips.append(target["boxes"][0, 0].item() > 32)  # box moved to the right half
    assert 0 < sum(flips) < len(flips)  # the flip really is random across (epoch, index)


def test_loader_batches_do_not_depend_on_worker_count(tmp_path):
    ds = flip_dataset(tmp_path)

    def batches(workers):
        sampler = ResumableSampler(len(ds), seed=1)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=workers)
        return [(images, [t["boxes"] for t in targets]) for images, targets in loader]

    reference = batches(0)
    for (img_a, boxes_a), (img_b, boxes_b) in zip(reference, batches(2)):
        assert torch.equal(img_a, img_b)
        assert all(torch.equal(a, b) for a, b in zip(boxes_a, boxes_b))


def test_unreadable_image_is_a_user_error(tmp_path):
    root = make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    image = root / "images" / "train" / "a.png"
    samples = read_yolo_split(root, "train", ["cat", "dog"])  # the header is fine ...
    image.write_bytes(image.read_bytes()[:100])  # ... then the pixel data is cut off
    with pytest.raises(DetpactError, match="Cannot read image") as err:
        DetectionDataset(samples, 64, train=False)[0]
    assert "a.png" in err.value.message


def test_ignore_regions_are_not_training_targets(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    sample = Sample(image, 64, 64, boxes, np.array([1, 2]), np.array([False, True]))
    _, target = DetectionDataset([sample], 64, train=False)[0]
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[0, 0, 10, 10]]
