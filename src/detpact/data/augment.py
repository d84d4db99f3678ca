"""The training transform pipeline: mosaic, random zoom and shift, HSV jitter, horizontal flip.

A training sample is built in two pure steps:

    params = draw_params(sample_rng(seed, epoch, index), cfg, size, index, num_samples)
    canvas, boxes, labels = augment_sample(params, sources, size, cfg)

`draw_params` makes every random choice, in a fixed order, from the generator of
(seed, epoch, index), so a sample never depends on DataLoader workers or load order;
`augment` is deterministic given the parameters and the source images (the sample
itself, then its mosaic partners).

Geometry (YOLO-style): a mosaic places four letterbox-resized images around a random
centre of a 2S x 2S layout, each touching the centre (parts beyond the layout's border
are cut); without mosaic the layout is the S x S letterbox canvas. The output is the
layout zoomed by `zoom` about its centre and shifted by `shift`, cut to S x S. All
steps are axis-aligned scale + offset maps, so each source image is warped once, only
where it lands on the canvas, and its boxes follow the same map exactly.

Box filtering is judged once, on the final canvas, against the box as the whole
geometric transform maps it (not step by step: a box cut in half by the mosaic and
again by the shift keeps a quarter of its area, not "half twice"). A box survives when
`min_visibility` of that area is on the canvas and both sides are at least
`min_box_size`. The plain letterbox (no mosaic, zoom 1, no shift) cuts nothing and
filters nothing, so training and evaluation see the same boxes.

albumentations 2.0.8 was tried and does not fit here: its Mosaic centres each image in
its cell (grey gaps at the junction) or crops it, its Affine keeps the input size (a
2S mosaic would be warped whole, then cropped: about 3x the pixels), and its bbox
filter measures visibility per transform (verified: two crops to 60 % then 36 % keep a
box at min_visibility 0.4). OpenCV does the resizing and colour work.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detpact.config import AugmentConfig
from detpact.data.transforms import PAD_VALUE, Letterbox, hflip, pad_to_canvas

# OpenCV's own thread pool would compete with the training threads (and with every other
# DataLoader worker) for the cores; parallelism here comes from the workers.
cv2.setNumThreads(0)


@dataclass(frozen=True)
class Source:
    """One image as the letterbox shows it: resized pixels, their place on the S x S canvas,
    and the training boxes on that canvas (ignore regions already removed)."""

    pixels: np.ndarray  # uint8 [h, w, 3], longer side S
    placement: Letterbox
    boxes: np.ndarray  # float32 [N, 4] xyxy, letterbox-canvas pixels
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class AugmentParams:
    """Every random choice for one training sample."""

    flip: bool
    partners: tuple[int, ...] = ()  # the 3 other sample indices of a mosaic; () for none
    centre: tuple[int, int] = (0, 0)  # mosaic centre (x, y) on the 2S x 2S layout
    zoom: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # pixels on the output canvas
    hsv: tuple[float, float, float] | None = None  # hue shift (fraction of the circle), saturation, value gains

    @property
    def moves_pixels(self) -> bool:
        return bool(self.partners) or self.zoom != 1.0 or self.shift != (0.0, 0.0)


def draw_params(rng: np.random.Generator, cfg: AugmentConfig, size: int, index: int,
                num_samples: int) -> AugmentParams:
    """Draw a sample's augmentation from `rng` (= sample_rng(seed, epoch, index)).

    The flip is drawn first and a disabled transform draws nothing: with only flips on
    (configs/quickstart.yaml), samples are exactly the letterbox + flip detpact made
    before this pipeline existed.
    """
    flip = bool(rng.random() < cfg.hflip_p)
    partners: tuple[int, ...] = ()
    centre = (0, 0)
    if cfg.mosaic_p > 0 and rng.random() < cfg.mosaic_p:
        partners = _draw_partners(rng, index, num_samples)
        cx, cy = rng.integers(size // 2, size * 3 // 2, size=2, endpoint=True)
        centre = (int(cx), int(cy))
    zoom = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale)) if cfg.scale > 0 else 1.0
    shift = (0.0, 0.0)
    if cfg.translate > 0:
        tx, ty = rng.uniform(-cfg.translate, cfg.translate, size=2) * size
        shift = (float(tx), float(ty))
    hsv = None
    if cfg.hsv_h > 0 or cfg.hsv_s > 0 or cfg.hsv_v > 0:
        dh, ds, dv = rng.uniform(-1.0, 1.0, size=3)
        hsv = (float(dh * cfg.hsv_h), float(1 + ds * cfg.hsv_s), float(1 + dv * cfg.hsv_v))
    return AugmentParams(flip, partners, centre, zoom, shift, hsv)


def _draw_partners(rng: np.random.Generator, index: int, num_samples: int) -> tuple[int, ...]:
    """3 indices other than `index`, distinct when the dataset has enough samples."""
    if num_samples < 2:
        return (index,) * 3
    others = rng.choice(num_samples - 1, size=3, replace=num_samples - 1 < 3)
    return tuple(int(i) + (i >= index) for i in others)  # skip `index` itself


def augment_sample(params: AugmentParams, sources: list[Source], size: int,
                   cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply `params` to the sample's sources ([sample, *partners]).

    Returns the canvas uint8 [size, size, 3] (PAD_VALUE where no image lands), boxes
    float32 [N, 4] xyxy inside [0, size], labels int64 [N].
    """
    if params.moves_pixels:
        canvas, boxes, labels = _place(params, sources, size, cfg)
    else:  # the letterbox: nothing is cut, so nothing is filtered
        source = sources[0]
        pixels = source.pixels if params.hsv is None else jitter_hsv(source.pixels, params.hsv)
        canvas = pad_to_canvas(pixels, source.placement, size)
        # Only float error can put an edge outside (1e-5 px): clipping leaves in-range boxes' bits alone.
        boxes = np.clip(source.boxes, 0, size)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], source.labels[keep]
    if params.flip:
        canvas, boxes = hflip(canvas, boxes)
    return canvas, boxes, labels


def _place(params: AugmentParams, sources: list[Source], size: int,
           cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp each source once onto the canvas where the layout -> zoom -> shift map puts it."""
    mosaic = bool(params.partners)
    layout = 2 * size if mosaic else size
    origins = _mosaic_origins(sources, params.centre) if mosaic else [
        (sources[0].placement.pad_x, sources[0].placement.pad_y)]
    centre_out = (size / 2 + params.shift[0], size / 2 + params.shift[1])
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    all_boxes, all_labels = [], []
    for source, origin in zip(sources, origins):
        height, width = source.pixels.shape[:2]
        # The part of the image inside the layout (a mosaic cuts at its border), in image pixels.
        x0, y0 = max(0, -origin[0]), max(0, -origin[1])
        x1, y1 = min(width, layout - origin[0]), min(height, layout - origin[1])
        if x1 <= x0 or y1 <= y0:
            continue
        # ... and where that part lands on the output canvas, rounded to whole pixels.
        out = [round((origin[axis % 2] + edge - layout / 2) * params.zoom + centre_out[axis % 2])
               for axis, edge in enumerate((x0, y0, x1, y1))]
        if out[2] <= out[0] or out[3] <= out[1]:
            continue
        window = (max(out[0], 0), max(out[1], 0), min(out[2], size), min(out[3], size))
        gain = ((out[2] - out[0]) / (x1 - x0), (out[3] - out[1]) / (y1 - y0))
        if window[2] > window[0] and window[3] > window[1]:
            patch = _warp(source.pixels[y0:y1, x0:x1], gain, (out[0] - window[0], out[1] - window[1]),
                          (window[2] - window[0], window[3] - window[1]))
            if params.hsv is not None:
                patch = jitter_hsv(patch, params.hsv)
            canvas[window[1] : window[3], window[0] : window[2]] = patch
        # The boxes follow the pixels' map: image pixel u -> out0 + (u - x0) * (out extent / image extent).
        pad = np.array([source.placement.pad_x, source.placement.pad_y] * 2, np.float64)
        full = (source.boxes - pad - np.array([x0, y0, x0, y0])) * np.array(gain * 2) + np.array(out[:2] * 2)
        clipped = np.clip(full, window[:2] * 2, window[2:] * 2)
        keep = _survives(full, clipped, cfg)
        all_boxes.append(clipped[keep])
        all_labels.append(source.labels[keep])
    boxes = np.concatenate(all_boxes).astype(np.float32) if all_boxes else np.zeros((0, 4), np.float32)
    labels = np.concatenate(all_labels).astype(np.int64) if all_labels else np.zeros((0,), np.int64)
    return canvas, boxes.reshape(-1, 4), labels


def _mosaic_origins(sources: list[Source], centre: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners on the 2S layout: the sample top-left of the centre, partners
    top-right, bottom-left, bottom-right, each image touching the centre."""
    cx, cy = centre
    (h0, w0), (h1, _), (_, w2) = (s.pixels.shape[:2] for s in sources[:3])
    return [(cx - w0, cy - h0), (cx, cy - h1), (cx - w2, cy), (cx, cy)]


def _survives(full: np.ndarray, clipped: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Boxes with min_visibility of their mapped area on the canvas and sides >= min_box_size."""
    full_area = (full[:, 2] - full[:, 0]) * (full[:, 3] - full[:, 1])
    width, height = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    return ((full_area > 0) & (width > 0) & (height > 0)
            & (width >= cfg.min_box_size) & (height >= cfg.min_box_size)
            & (width * height >= cfg.min_visibility * full_area))


def _warp(pixels: np.ndarray, gain: tuple[float, float], offset: tuple[int, int],
          shape: tuple[int, int]) -> np.ndarray:
    """The window [shape = (w, h)] of `pixels` scaled by `gain` and placed at `offset`
    (the scaled image's top-left relative to the window's). Computes only the window's
    pixels, with OpenCV's resize convention of pixel centres at +0.5; an unscaled
    image at a whole-pixel offset is copied exactly."""
    (gx, gy), (ox, oy) = gain, offset
    matrix = np.array([[gx, 0.0, 0.5 * gx - 0.5 + ox], [0.0, gy, 0.5 * gy - 0.5 + oy]])
    return cv2.warpAffine(pixels, matrix, shape, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def jitter_hsv(pixels: np.ndarray, hsv: tuple[float, float, float]) -> np.ndarray:
    """RGB uint8 [h, w, 3] with its hue turned by hsv[0] of the circle and saturation and value
    multiplied by hsv[1], hsv[2] (OpenCV's 8-bit HSV: hue in [0, 180), lookup tables as in YOLO)."""
    hue_shift, sat_gain, val_gain = hsv
    x = np.arange(256, dtype=np.float64)
    lut_hue = np.mod(np.rint(x + hue_shift * 180), 180).astype(np.uint8)
    lut_sat = np.clip(np.rint(x * sat_gain), 0, 255).astype(np.uint8)
    lut_val = np.clip(np.rint(x * val_gain), 0, 255).astype(np.uint8)
    hue, sat, val = cv2.split(cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2HSV))
    jittered = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(jittered, cv2.COLOR_HSV2RGB)
