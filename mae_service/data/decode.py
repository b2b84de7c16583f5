"""Image decoding and augmentation: encoded bytes → uint8 ``[3, H, W]``. Pure (PIL + numpy, no Ray).

The crop is chosen from the image *header* before any pixel is decoded, so a JPEG can be decoded at a reduced
DCT scale (``Image.draft``, 1/2, 1/4 or 1/8) whenever the crop, scaled down, still has at least ``size`` pixels
on each side. That is the main lever on decode cost: a 224² crop out of a 1024² photo decodes ~16× fewer pixels.

Every random choice comes from an explicit :class:`numpy.random.Generator`; :func:`item_rng` derives one from
``(seed, epoch, item id)`` so an image gets the same crop whichever worker decodes it.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile

MAX_PIXELS = 64_000_000
"""Images declaring more pixels than this (width × height) are rejected as decompression bombs."""

# PIL's own guard, set explicitly: it warns above MAX_IMAGE_PIXELS and raises above twice that. We check the
# header size against ``max_pixels`` ourselves first, so this is a second line of defence.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad object, not a grey-bottomed image

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
_DRAFT_SCALES = (8, 4, 2)


class BadImageError(ValueError):
    """The bytes are not a decodable image within the limits (empty, truncated, not an image, too large)."""


def item_rng(seed: int, epoch: int, item_id: int) -> np.random.Generator:
    """The generator for one item's augmentation: the same triple gives the same crop and flip anywhere."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(item_id), 0x4D4145])


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse the header only (no pixel decode); raise :class:`BadImageError` for empty, unknown or huge images."""
    if not data:
        raise BadImageError("zero-byte object")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size checked below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own guard (twice MAX_PIXELS) fired before ours could
        raise BadImageError(f"decompression bomb: over the limit of {max_pixels} pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise BadImageError(f"not a readable image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise BadImageError(f"decompression bomb: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels")
    return img


def draft_scale(crop_w: float, crop_h: float, size: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4 or 8) that keeps a ``crop_w × crop_h`` crop at ≥ ``size`` per side."""
    for s in _DRAFT_SCALES:
        if crop_w >= s * size and crop_h >= s * size:
            return s
    return 1


def _draft(img: Image.Image, scale: int) -> None:
    """Ask the JPEG decoder for a 1/scale decode (no-op for other formats or scale 1)."""
    if scale > 1 and img.format == "JPEG":
        w, h = img.size
        img.draft("RGB", (max(1, w // scale), max(1, h // scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency is composited on white; 16/32-bit greys are scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.float32)
        a = np.clip(a / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "F":
        a = np.clip(np.asarray(img, dtype=np.float32), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, ...


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces as OSError, SyntaxError, zlib.error...
        raise BadImageError(f"decode failed: {type(e).__name__}: {e}") from None
    return img


def decode_image(data: bytes, *, target: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode to an RGB image; with ``target``, a JPEG may be decoded at 1/2–1/8 scale keeping the shorter
    side ≥ ``target``. Raises :class:`BadImageError` for anything that is not a decodable image."""
    img = open_image(data, max_pixels=max_pixels)
    if target:
        _draft(img, draft_scale(img.size[0], img.size[1], target))
    return to_rgb(_load(img))


def sample_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters ``(left, top, w, h)`` in pixels of a ``width × height`` image.

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; up to 10 tries, then the largest
    centred crop whose ratio is inside ``ratio`` (the usual fallback).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _crop_resize(
    img: Image.Image, box: tuple[float, float, float, float], size: int, full: tuple[int, int]
) -> Image.Image:
    """Load ``img`` (possibly drafted), crop ``box`` given in full-resolution pixels, resize to ``size²``."""
    _load(img)
    sx, sy = img.size[0] / full[0], img.size[1] / full[1]
    left, top, right, bottom = box
    box_d = (left * sx, top * sy, right * sx, bottom * sy)
    if img.mode in ("RGB", "L"):  # resize first: fewer pixels to convert
        return to_rgb(img.resize((size, size), Image.Resampling.BICUBIC, box=box_d))
    return to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, box=box_d)


def to_chw(img: Image.Image) -> np.ndarray:
    """RGB PIL image → contiguous uint8 ``[3, H, W]``."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def random_resized_crop(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
    flip_p: float = 0.5,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Encoded bytes → RandomResizedCrop (bicubic) + horizontal flip → uint8 ``[3, size, size]``.

    The crop is drawn from the header size before decoding, then a JPEG is decoded at the smallest DCT scale
    that keeps the crop ≥ ``size`` per side. Raises :class:`BadImageError` for bad bytes.
    """
    img = open_image(data, max_pixels=max_pixels)
    full = img.size
    left, top, w, h = sample_crop(full[0], full[1], rng, scale, ratio)
    flip = rng.random() < flip_p
    _draft(img, draft_scale(w, h, size))
    out = _crop_resize(img, (left, top, left + w, top + h), size, full)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_chw(out)


def center_crop(data: bytes, size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes → shorter side resized to ``size`` (bicubic), centre taken → uint8 ``[3, size, size]``."""
    img = open_image(data, max_pixels=max_pixels)
    full = img.size
    side = min(full)
    left, top = (full[0] - side) / 2, (full[1] - side) / 2
    _draft(img, draft_scale(side, side, size))
    return to_chw(_crop_resize(img, (left, top, left + side, top + side), size, full))
