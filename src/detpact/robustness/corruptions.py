"""Image corruptions for the scenario suite, deterministic per (image, name, severity, seed).

The seven corruptions follow the families of ImageNet-C / COCO-C (Hendrycks & Dietterich
2019; Michaelis et al. 2019), with severity tables of our own, 1 (mild) to 5 (strongest).
Each works on the original image, before the letterbox, and never moves a box: occlusion
patches are painted over the pixels and every label stays where it was.

Determinism: every random draw comes from `np.random.default_rng([seed, k])`, where k is
the corruption's index in CORRUPTIONS, never from a global RNG, so the same image, name,
severity and seed give the same bytes in any call order. The severity is deliberately not
part of the generator's seed: the noise pattern, the haze field and the patch places are
the same at every severity and only grow stronger, so a higher severity is strictly a
heavier version of the same corruption. Callers derive `seed` per image with `image_seed`.

Sizes that are spatial (blur sigma) are given for an image whose longer side is 224 px,
ImageNet-C's scale, and scaled with the image, so a severity means the same once the
image is letterboxed to the model's input whatever the source resolution.
"""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
from PIL import Image

from detpact.errors import DetpactError

CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "blur", "brightness", "contrast", "jpeg", "haze", "occlusion")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

REFERENCE_SIDE = 224  # the image side the spatial severities below are stated for

# Severity tables: entry s - 1 is severity s.
NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.26)       # std of additive Gaussian noise, in [0, 1] intensity
BLUR_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)           # Gaussian blur sigma, pixels at REFERENCE_SIDE
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)     # added to HSV value (as ImageNet-C: brighter)
CONTRAST_FACTOR = (0.6, 0.45, 0.3, 0.2, 0.12)    # pixel deviations from the channel mean are scaled by this
JPEG_QUALITY = (30, 20, 15, 10, 7)               # Pillow JPEG quality
HAZE_DENSITY = (0.3, 0.6, 0.9, 1.3, 1.8)         # optical depth of the haze: transmission exp(-density * field)
OCCLUSION_AREA = (0.04, 0.08, 0.15, 0.25, 0.35)  # summed patch area, fraction of the image

HAZE_AIRLIGHT = 0.85   # grey-white light the haze scatters into the image, in [0, 1]
HAZE_GRID = 4          # the haze field is smooth noise drawn on a grid this coarse, then upsampled
OCCLUSION_PATCHES = 4  # patches per image; each covers OCCLUSION_AREA / OCCLUSION_PATCHES


def image_seed(seed: int, image_key: str) -> int:
    """A per-image seed from the suite's seed and a stable image key (e.g. its dataset-relative
    path): the first 8 bytes of sha256, so it is the same in every process and Python version
    (unlike hash(), which is salted per process). Non-negative and below 2**63."""
    digest = hashlib.sha256(f"{int(seed)}\0{image_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (uint8 [H, W, 3], RGB) with corruption `name` at `severity` (1..5) applied;
    the result has the same shape and dtype. The input is not modified."""
    _check(image, name, severity, seed)
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name)])
    level = severity - 1
    if name == "jpeg":
        return _jpeg(image, JPEG_QUALITY[level])
    pixels = image.astype(np.float32) / 255.0
    if name == "gaussian_noise":
        out = pixels + NOISE_STD[level] * rng.standard_normal(pixels.shape, dtype=np.float32)
    elif name == "blur":
        out = _blur(pixels, BLUR_SIGMA[level] * max(image.shape[:2]) / REFERENCE_SIDE)
    elif name == "brightness":
        out = _brightness(pixels, BRIGHTNESS_SHIFT[level])
    elif name == "contrast":
        mean = pixels.mean(axis=(0, 1), keepdims=True)
        out = (pixels - mean) * CONTRAST_FACTOR[level] + mean
    elif name == "haze":
        out = _haze(pixels, HAZE_DENSITY[level], rng)
    else:  # occlusion
        out = _occlude(pixels, OCCLUSION_AREA[level], rng)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _check(image: np.ndarray, name: str, severity: int, seed: int) -> None:
    if name not in CORRUPTIONS:
        raise DetpactError(f"Unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}.")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise DetpactError(f"Corruption severity {severity!r} is not valid: choose an integer 1 to 5 "
                           "(5 is the strongest).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DetpactError(f"Corruption seed {seed!r} is not valid: give a non-negative integer (see image_seed).")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DetpactError(f"corrupt() takes an RGB image as uint8 [H, W, 3], not {described}.")


def _blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    # Kernel of +-3 sigma (odd size); reflected borders so the image edge does not darken.
    size = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(pixels, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _brightness(pixels: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)  # float input: V in [0, 1]
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0.0, 1.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def _haze(pixels: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering, I = J t + A (1 - t), with transmission t = exp(-density * field):
    a smooth random field in [0.5, 1] stands in for scene depth, so the haze is patchy like fog."""
    height, width = pixels.shape[:2]
    coarse = rng.random((HAZE_GRID + 1, HAZE_GRID + 1), dtype=np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field = 0.5 + 0.5 * np.clip(field, 0.0, 1.0)
    transmission = np.exp(-density * field)[..., None]
    return pixels * transmission + HAZE_AIRLIGHT * (1.0 - transmission)


def _occlude(pixels: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
    """OCCLUSION_PATCHES solid rectangles of random colour and aspect ratio, centred at random
    places; they may reach past the border (then clipped) and overlap one another."""
    height, width = pixels.shape[:2]
    out = pixels.copy()
    # All draws first, independent of the severity, so patches only grow with it.
    centres = rng.random((OCCLUSION_PATCHES, 2))
    aspects = np.exp(rng.uniform(np.log(0.5), np.log(2.0), OCCLUSION_PATCHES))
    colours = rng.random((OCCLUSION_PATCHES, 3), dtype=np.float32)
    patch_area = area / OCCLUSION_PATCHES * width * height
    for (cx, cy), aspect, colour in zip(centres, aspects, colours):
        patch_w, patch_h = np.sqrt(patch_area * aspect), np.sqrt(patch_area / aspect)
        x0, x1 = round(cx * width - patch_w / 2), round(cx * width + patch_w / 2)
        y0, y1 = round(cy * height - patch_h / 2), round(cy * height + patch_h / 2)
        out[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = colour
    return out
