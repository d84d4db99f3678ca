"""Training augmentation, the decoded-image cache and the sample grid.

The geometric invariants are checked on images of one flat colour per image whose one
box is the whole image: then a box's pixels can be counted on the output canvas, which
makes visibility and box/pixel alignment measurable independently of the code.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detpact.config import AugmentConfig
from detpact.data import cache as cache_module
from detpact.data.augment import draw_params
from detpact.data.cache import ImageCache
from detpact.data.dataset import DetectionDataset, collate
from detpact.data.formats import Sample, open_rgb
from detpact.data.sampler import ResumableSampler
from detpact.data.show import GAP, save_grid
from detpact.data.transforms import PAD_VALUE, hflip, letterbox, letterbox_boxes, sample_rng

SIZE = 96
OFF = dict(mosaic_p=0.0, scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, hflip_p=0.0)
FULL = AugmentConfig(mosaic_p=0.5, scale=0.5, translate=0.2, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, hflip_p=0.5)
# Flat colours, far apart in RGB; colour k is image k's (label k).
COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (230, 30, 230),
           (250, 250, 250), (10, 10, 10)]
SHAPES = [(90, 60), (50, 120), (100, 100), (140, 70), (64, 48), (33, 99), (120, 121), (75, 40)]  # (w, h)


def flat_samples(folder: Path) -> list[Sample]:
    """Image k: one colour, one box = the whole image, label k."""
    samples = []
    for k, ((w, h), colour) in enumerate(zip(SHAPES, COLOURS)):
        path = folder / f"flat{k}.png"
        Image.new("RGB", (w, h), colour).save(path)
        samples.append(Sample(path, w, h, np.array([[0, 0, w, h]], np.float32), np.array([k])))
    return samples


def textured_samples(folder: Path, count: int = 6) -> list[Sample]:
    """Noise images with a few boxes each (and an ignore region in the first)."""
    rng = np.random.default_rng(0)
    samples = []
    for k in range(count):
        w, h = int(rng.integers(40, 130)), int(rng.integers(40, 130))
        path = folder / f"tex{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        x1, y1 = rng.uniform(0, 0.5, (2, 3)) * [[w], [h]]
        boxes = np.stack([x1, y1, x1 + w / 3, y1 + h / 3], axis=1).astype(np.float32)
        ignore = np.array([False, False, True]) if k == 0 else None
        samples.append(Sample(path, w, h, boxes, rng.integers(0, 3, 3), ignore))
    return samples


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> list[Sample]:
    return flat_samples(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> list[Sample]:
    return textured_samples(tmp_path_factory.mktemp("tex"))


def colour_mask(image: torch.Tensor, colour: tuple[int, int, int]) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() == np.array(colour, np.uint8)).all(axis=2)


@pytest.mark.parametrize("name, cfg", [
    ("mosaic", AugmentConfig(**{**OFF, "mosaic_p": 1.0})),
    ("scale", AugmentConfig(**{**OFF, "scale": 0.5})),
    ("translate", AugmentConfig(**{**OFF, "translate": 0.4, "min_visibility": 0.6})),
    ("flip", AugmentConfig(**{**OFF, "hflip_p": 0.5})),
    ("mosaic+scale+translate+flip", AugmentConfig(**{**OFF, "mosaic_p": 0.7, "scale": 0.5, "translate": 0.3,
                                                     "hflip_p": 0.5, "min_visibility": 0.4, "min_box_size": 6})),
    ("min_box_size", AugmentConfig(**{**OFF, "mosaic_p": 1.0, "translate": 0.3, "min_visibility": 0.0,
                                      "min_box_size": 30})),
])
def test_boxes_match_pixels_and_respect_visibility(flat, name, cfg):
    """Every kept box is exactly its image's visible pixels, has >= min_visibility of the
    area the transform maps the whole image to, and every dropped one had less (or a side
    under min_box_size)."""
    ds = DetectionDataset(flat, SIZE, train=True, seed=3, augment=cfg)
    tol = 0.04  # the mapped image is placed on whole pixels: its area is off by < 1 px per side
    seen_cut, seen_drop, seen_mosaic = 0, 0, 0
    for epoch in range(3):
        for index in range(len(flat)):
            image, target = ds[(epoch, index)]
            params = draw_params(sample_rng(3, epoch, index), cfg, SIZE, index, len(flat))
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
            boxes, labels = target["boxes"].numpy(), target["labels"].tolist()
            assert boxes.dtype == np.float32 and (boxes >= 0).all() and (boxes <= SIZE).all()
            assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
            assert len(set(labels)) == len(labels)  # a mosaic takes distinct partners here
            seen_mosaic += bool(params.partners)
            for k in (index, *params.partners):
                w, h = SHAPES[k]
                long_side_scale = SIZE / max(w, h)
                full_area = (w * long_side_scale * params.zoom) * (h * long_side_scale * params.zoom)
                mask = colour_mask(image, COLOURS[k])
                visible = mask.sum() / full_area
                if k in labels:
                    x1, y1, x2, y2 = boxes[labels.index(k)]
                    ys, xs = np.nonzero(mask)
                    # Letterbox boxes scale exactly while the pixels are resized to whole
                    # pixels: an edge can be up to half a (zoomed) pixel off.
                    np.testing.assert_allclose((x1, y1, x2, y2), (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),
                                               atol=0.5 * max(1.0, params.zoom) + 1e-4, err_msg=f"{name} {index}")
                    assert visible >= cfg.min_visibility - tol
                    if params.moves_pixels:
                        assert min(x2 - x1, y2 - y1) >= cfg.min_box_size
                    seen_cut += visible < 1 - tol
                else:
                    ys, xs = np.nonzero(mask)
                    small = mask.any() and min(np.ptp(xs) + 1, np.ptp(ys) + 1) < cfg.min_box_size + 1
                    assert visible < cfg.min_visibility + tol or small, (name, epoch, index, k, visible)
                    seen_drop += 1
    if name not in ("flip", "scale"):  # a zoom about the centre alone rarely cuts an image below 25 %
        assert seen_cut > 0 and seen_drop > 0  # the cases the test is about did occur
    if "mosaic" in name:
        assert seen_mosaic > 0


def test_zoomed_pixels_are_the_resized_image(textured):
    """The warp follows OpenCV's resize convention (pixel centres at +0.5): on noise, any
    sub-pixel misplacement shows as a large difference."""
    cfg = AugmentConfig(**{**OFF, "scale": 0.4})
    ds = DetectionDataset(textured, SIZE, train=True, seed=0, augment=cfg)
    for index in range(len(textured)):
        zoom = draw_params(sample_rng(0, 0, index), cfg, SIZE, index, len(textured)).zoom
        source = ds.source(index)
        (h, w), p = source.pixels.shape[:2], source.placement
        out = [round((edge - SIZE / 2) * zoom + SIZE / 2) for edge in (p.pad_x, p.pad_y, p.pad_x + w, p.pad_y + h)]
        expected = cv2.resize(source.pixels, (out[2] - out[0], out[3] - out[1]), interpolation=cv2.INTER_LINEAR)
        x0, y0, x1, y1 = max(out[0], 0), max(out[1], 0), min(out[2], SIZE), min(out[3], SIZE)
        expected = expected[y0 - out[1] : y1 - out[1], x0 - out[0] : x1 - out[0]].astype(np.int16)
        image = ds[(0, index)][0].permute(1, 2, 0).numpy()[y0:y1, x0:x1].astype(np.int16)
        assert np.abs(image - expected).mean() < 2.0, (index, zoom)


def test_padding_is_pad_value_and_hsv_changes_only_image_pixels(flat):
    cfg = AugmentConfig(**{**OFF, "hsv_h": 0.2, "hsv_s": 0.7, "hsv_v": 0.4})
    plain = DetectionDataset(flat, SIZE, train=False)
    jittered = DetectionDataset(flat, SIZE, train=True, seed=1, augment=cfg)
    changed = 0
    for index in range(len(flat)):
        base, base_target = plain[index]
        image, target = jittered[(0, index)]
        torch.testing.assert_close(target["boxes"], base_target["boxes"])  # colour never moves boxes
        pad = colour_mask(base, (PAD_VALUE,) * 3)
        assert (image.permute(1, 2, 0).numpy()[pad] == PAD_VALUE).all()
        changed += not torch.equal(image, base)
    assert changed >= len(flat) - 1


def test_same_seed_epoch_index_same_sample_across_instances_and_workers(textured):
    first = DetectionDataset(textured, SIZE, train=True, seed=5, augment=FULL)
    second = DetectionDataset(textured, SIZE, train=True, seed=5, augment=FULL, cache=ImageCache("ram"))
    for epoch in range(2):
        for index in range(len(textured)):
            (a, ta), (b, tb) = first[(epoch, index)], second[(epoch, index)]
            assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
            assert torch.equal(ta["labels"], tb["labels"])

    def batches(workers: int) -> list:
        sampler = ResumableSampler(len(first), seed=1)
        sampler.set_epoch(2)
        loader = DataLoader(first, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=workers)
        return [(images, [t["boxes"] for t in targets]) for images, targets in loader]

    reference, parallel = batches(0), batches(2)
    assert len(reference) == len(parallel) == 3
    for (img_a, boxes_a), (img_b, boxes_b) in zip(reference, parallel):
        assert torch.equal(img_a, img_b) and all(torch.equal(a, b) for a, b in zip(boxes_a, boxes_b))


def test_epochs_differ_and_seeds_differ(textured):
    ds = DetectionDataset(textured, SIZE, train=True, seed=5, augment=FULL)
    other_seed = DetectionDataset(textured, SIZE, train=True, seed=6, augment=FULL)
    for index in range(3):
        assert not torch.equal(ds[(0, index)][0], ds[(1, index)][0])
        assert not torch.equal(ds[(0, index)][0], other_seed[(0, index)][0])


def test_mosaic_combines_four_images(flat):
    ds = DetectionDataset(flat, SIZE, train=True, seed=0, augment=AugmentConfig(**{**OFF, "mosaic_p": 1.0}))
    labels_per_sample = []
    for index in range(len(flat)):
        params = draw_params(sample_rng(0, 0, index), ds.augment, SIZE, index, len(flat))
        assert len(params.partners) == 3 and index not in params.partners and len(set(params.partners)) == 3
        assert SIZE // 2 <= min(params.centre) <= max(params.centre) <= SIZE * 3 // 2
        image, target = ds[(0, index)]
        assert image.shape == (3, SIZE, SIZE)
        assert set(target["labels"].tolist()) <= {index, *params.partners}
        labels_per_sample.append(len(target["labels"]))
    assert max(labels_per_sample) >= 3  # several images really share a canvas


def test_flip_only_reproduces_the_old_letterbox_and_flip(textured):
    """configs/quickstart.yaml turns everything off but flips: its samples must stay the
    bytes detpact produced before the augmentation pipeline (letterbox + seeded flip)."""
    cfg = AugmentConfig(**{**OFF, "hflip_p": 0.5})
    ds = DetectionDataset(textured, SIZE, train=True, seed=0, augment=cfg, cache=ImageCache("ram"))
    flips = 0
    for epoch in range(3):
        for index, sample in enumerate(textured):
            canvas, placement = letterbox(open_rgb(sample.image_path), SIZE)
            keep = slice(None) if sample.ignore is None else ~sample.ignore
            boxes = letterbox_boxes(sample.boxes[keep], placement)
            if sample_rng(0, epoch, index).random() < 0.5:
                canvas, boxes = hflip(canvas, boxes)
                flips += 1
            image, target = ds[(epoch, index)]
            assert np.array_equal(image.permute(1, 2, 0).numpy(), canvas)
            assert np.array_equal(target["boxes"].numpy(), boxes) and target["boxes"].dtype == torch.float32
            assert target["labels"].tolist() == sample.labels[keep].tolist()
    assert 0 < flips < 3 * len(textured)


def test_eval_samples_are_the_plain_letterbox(textured):
    ds = DetectionDataset(textured, SIZE, train=False, augment=FULL)
    for index, sample in enumerate(textured):
        canvas, placement = letterbox(open_rgb(sample.image_path), SIZE)
        image, target = ds[index]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), canvas)
        assert (target["scale"], target["pad"]) == (placement.scale, (placement.pad_x, placement.pad_y))


def test_cache_modes_give_identical_tensors_and_disk_is_reused(textured, tmp_path, monkeypatch):
    folder = tmp_path / "decoded"
    outputs = {}
    for mode in ("none", "ram", "disk"):
        ds = DetectionDataset(textured, SIZE, train=True, seed=2, augment=FULL,
                              cache=ImageCache(mode, folder if mode == "disk" else None))
        outputs[mode] = [ds[(1, i)] for i in range(len(textured))]
    for mode in ("ram", "disk"):
        for (a, ta), (b, tb) in zip(outputs["none"], outputs[mode]):
            assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    files = sorted(folder.glob("*.npy"))
    assert len(files) == len(textured) and not list(folder.glob("*.tmp"))

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(cache_module, "open_rgb", no_decoding)
    again = DetectionDataset(textured, SIZE, train=True, seed=2, augment=FULL, cache=ImageCache("disk", folder))
    for (a, ta), index in zip(outputs["none"], range(len(textured))):
        b, tb = again[(1, index)]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    with pytest.raises(AssertionError, match="decoded"):  # another size is another key
        ImageCache("disk", folder).load(textured[0].image_path, SIZE + 32)


def test_disk_cache_notices_a_changed_image_and_a_damaged_entry(textured, tmp_path):
    cache = ImageCache("disk", tmp_path)
    sample = textured[1]
    first = cache.load(sample.image_path, SIZE)
    (entry,) = tmp_path.glob("*.npy")
    entry.write_bytes(b"not an array")  # damaged: decoded again, rewritten
    assert np.array_equal(cache.load(sample.image_path, SIZE), first)
    assert np.array_equal(np.load(entry), first)
    image = tmp_path / "edited.png"
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(image)
    assert cache.load(image, SIZE).max() == 0
    Image.fromarray(np.full((50, 80, 3), 200, np.uint8)).save(image)  # same path and size, new content
    assert cache.load(image, SIZE).min() == 200


def test_save_grid_writes_a_png_of_tiles(textured, tmp_path):
    ds = DetectionDataset(textured, SIZE, train=True, seed=0, augment=FULL)
    path = save_grid(ds, ["a", "b", "c"], tmp_path / "out" / "grid.png", count=5, columns=3)
    with Image.open(path) as grid:
        assert grid.format == "PNG"
        assert grid.size == (3 * SIZE + 2 * GAP, 2 * SIZE + GAP)
        pixels = np.asarray(grid.convert("RGB"))
    assert (pixels[SIZE + GAP :, SIZE * 2 + GAP * 2 :] == 255).all()  # the empty sixth tile
    assert not np.array_equal(pixels[:SIZE, :SIZE], ds[(0, 0)][0].permute(1, 2, 0).numpy())  # boxes drawn
