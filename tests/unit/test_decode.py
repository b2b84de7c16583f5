"""Decoding and augmentation (pure): every PIL mode → RGB, draft-mode decode, crop bounds, determinism, bad bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mae_service.data import decode as D


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_objects() -> dict[str, bytes]:
    """Objects that must be rejected: zero bytes, text, a truncated JPEG, a PNG bomb."""
    jpeg = encode(gradient(64, 64), "JPEG", quality=90)
    return {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 5,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": png_bomb(),
    }


MODE_CASES = {
    "RGB-jpeg": lambda: encode(gradient(40, 30), "JPEG"),
    "L-jpeg": lambda: encode(gradient(40, 30).convert("L"), "JPEG"),
    "CMYK-jpeg": lambda: encode(gradient(40, 30).convert("CMYK"), "JPEG"),
    "RGB-png": lambda: encode(gradient(40, 30)),
    "L": lambda: encode(gradient(40, 30).convert("L")),
    "LA": lambda: encode(gradient(40, 30).convert("LA")),
    "RGBA": lambda: encode(gradient(40, 30).convert("RGBA")),
    "P": lambda: encode(gradient(40, 30).quantize(16)),
    "P-transparent": lambda: encode(gradient(40, 30).quantize(16), transparency=0),
    "1": lambda: encode(gradient(40, 30).convert("1")),
    "I;16": lambda: encode(Image.fromarray(np.full((30, 40), 40000, np.uint16))),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_decodes_to_rgb(case):
    img = D.decode_image(MODE_CASES[case]())
    assert img.mode == "RGB" and img.size == (40, 30)
    out = D.random_resized_crop(MODE_CASES[case](), 16, np.random.default_rng(0))
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_alpha_is_composited_on_white_and_16bit_is_scaled():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.all(np.asarray(D.decode_image(encode(rgba))) == 255)
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    assert np.asarray(D.decode_image(encode(opaque)))[0, 0].tolist() == [10, 20, 30]
    grey16 = Image.fromarray(np.array([[0, 65535], [257 * 100, 257 * 200]], np.uint16))
    assert np.asarray(D.decode_image(encode(grey16)))[..., 0].tolist() == [[0, 255], [100, 200]]


def test_draft_decodes_jpeg_at_reduced_size_keeping_target():
    data = encode(gradient(512, 384), "JPEG", quality=90)
    assert D.decode_image(data).size == (512, 384)
    assert D.decode_image(data, target=48).size == (64, 48)  # 1/8: shorter side 48 ≥ 48
    assert D.decode_image(data, target=60).size == (128, 96)  # 1/4
    assert D.decode_image(encode(gradient(512, 384)), target=48).size == (512, 384)  # PNG: no draft
    assert D.draft_scale(512, 512, 64) == 8 and D.draft_scale(511, 512, 64) == 4 and D.draft_scale(100, 900, 64) == 1


def test_draft_crop_has_right_size_and_matches_full_decode():
    data = encode(gradient(800, 600), "JPEG", quality=95)
    for seed in range(5):
        fast = D.random_resized_crop(data, 32, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        left, top, w, h = D.sample_crop(800, 600, rng)
        flip = rng.random() < 0.5
        full = D.decode_image(data).resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        ref = D.to_chw(full.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else full)
        assert fast.shape == ref.shape == (3, 32, 32)
        assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 4  # same crop, reduced-scale decode


def test_crop_params_within_scale_and_ratio():
    rng = np.random.default_rng(0)
    for w, h in [(224, 224), (640, 480), (300, 500), (37, 41)]:
        for _ in range(300):
            left, top, cw, ch = D.sample_crop(w, h, rng)
            assert 0 <= left and 0 <= top and left + cw <= w and top + ch <= h
            area = cw * ch / (w * h)
            tol = 2.5 / min(cw, ch)  # rounding of w and h to pixels
            assert 0.2 * (1 - tol) ** 2 <= area <= 1.0
            assert 3 / 4 * (1 - tol) <= cw / ch <= 4 / 3 * (1 + tol)


def test_same_seed_same_crop_and_flip_mirrors():
    data = encode(gradient(120, 90), "JPEG")
    a = D.random_resized_crop(data, 24, D.item_rng(7, 2, 123))
    b = D.random_resized_crop(data, 24, D.item_rng(7, 2, 123))
    c = D.random_resized_crop(data, 24, D.item_rng(7, 3, 123))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    no_flip = D.random_resized_crop(data, 24, np.random.default_rng(1), flip_p=0.0)
    flip = D.random_resized_crop(data, 24, np.random.default_rng(1), flip_p=1.0)
    assert np.array_equal(flip, no_flip[:, :, ::-1])


def test_center_crop_resizes_shorter_side_and_keeps_centre():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (50, 0, 150, 100))  # blue centre square
    out = D.center_crop(encode(img), 32)
    assert out.shape == (3, 32, 32)
    assert out[2].mean() > 240 and out[0].mean() < 15


@pytest.mark.parametrize("name", sorted(bad_objects()))
def test_bad_bytes_raise_bad_image_error(name):
    data = bad_objects()[name]
    with pytest.raises(D.BadImageError):
        D.random_resized_crop(data, 16, np.random.default_rng(0))
    with pytest.raises(D.BadImageError):
        D.center_crop(data, 16)


def test_pixel_limit_is_explicit():
    data = encode(gradient(100, 100))
    assert D.decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(D.BadImageError, match="over the limit"):
        D.decode_image(data, max_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS == D.MAX_PIXELS
