"""A labelled synthetic image set whose classes differ only in shape and structure.

Twelve procedurally drawn classes (circle, ring, square, triangle, cross, star, horizontal/vertical stripes,
checkerboard, dot grid, spiral, zigzag), each with a random position and scale (and rotation, where a shape has
one), a random grey level for the shape and a contrasting one for a softly shaded, lightly noisy background.
Brightness says nothing about the class: a representation has to see shape.

The set is grey-level on purpose: with a random hue per image (the first design), a short MAE run spent itself
on colour, and its k-NN stayed within 2 points of random weights (benchmarks/README.md, "Demo recipe").
Images are written as real JPEG files (and 1 in 10 as PNG, in RGB, grey or palette mode) in any registered
format (:mod:`mae_service.data.formats`), to a local folder or ``s3://``. No Ray.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageDraw

from mae_service.data import formats
from mae_service.data.storage import filesystem_for, join

logger = logging.getLogger(__name__)

CLASSES = (
    "circle",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "hstripes",
    "vstripes",
    "checkerboard",
    "dots",
    "spiral",
    "zigzag",
)


# ---- drawing ------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [S, S, 3] in 0..255: a grey level shaded by up to ±40 along a random direction, plus weak noise."""
    g0 = rng.uniform(0, 255)
    g1 = float(np.clip(g0 + rng.uniform(-40, 40), 0, 255))
    angle = rng.uniform(0, 2 * math.pi)
    t = np.linspace(-1, 1, size, dtype=np.float32)
    proj = (math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None]) * 0.5 + 0.5  # [S, S] in 0..1
    img = np.repeat((g0 * (1 - proj) + g1 * proj)[..., None], 3, axis=2)
    sigma = rng.uniform(0, 8)
    if sigma > 2:
        img = img + rng.normal(0, sigma, (size, size, 1)).astype(np.float32)  # the same noise in each channel
    return img.astype(np.float32)


def _foreground(rng: np.random.Generator, bg_mean: np.ndarray) -> tuple[int, int, int]:
    """A random grey level at least 80 away from the background's mean brightness."""
    b = float(bg_mean.mean())
    lo, hi = max(0.0, b - 80), min(255.0, b + 80)  # the excluded band around the background
    free = lo + (255.0 - hi)  # the length of [0, lo) ∪ (hi, 255]
    u = rng.uniform(0, free)
    g = int(round(u if u < lo else hi + (u - lo)))
    return (g, g, g)


def _polygon(cx: float, cy: float, radii: list[float], rot: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _draw(cls: str, d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, fg: tuple[int, int, int]) -> None:
    s = float(size)
    r = rng.uniform(0.28, 0.42) * s
    cx, cy = rng.uniform(r * 0.8, s - r * 0.8), rng.uniform(r * 0.8, s - r * 0.8)
    box = (cx - r, cy - r, cx + r, cy + r)
    line = max(1, round(r * rng.uniform(0.18, 0.3)))
    if cls == "circle":
        d.ellipse(box, fill=fg)
    elif cls == "ring":
        d.ellipse(box, outline=fg, width=line)
    elif cls == "square":
        h = r * 0.85
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fg)
    elif cls == "triangle":
        d.polygon(_polygon(cx, cy, [r] * 3, rng.uniform(0, 2 * math.pi)), fill=fg)
    elif cls == "cross":
        d.rectangle((cx - r, cy - line, cx + r, cy + line), fill=fg)
        d.rectangle((cx - line, cy - r, cx + line, cy + r), fill=fg)
    elif cls == "star":
        d.polygon(_polygon(cx, cy, [r, r * 0.4] * 5, rng.uniform(0, 2 * math.pi)), fill=fg)
    elif cls in ("hstripes", "vstripes", "checkerboard", "dots"):
        period = max(4.0, r * rng.uniform(0.3, 0.55))
        n = max(2, int(2 * r // period))
        x0, y0 = cx - r, cy - r
        for i in range(n):
            for j in range(n) if cls in ("checkerboard", "dots") else range(1):
                a, b = x0 + i * period, y0 + j * period
                if cls == "hstripes":
                    d.rectangle((x0, y0 + i * period, x0 + 2 * r, y0 + i * period + period / 2), fill=fg)
                elif cls == "vstripes":
                    d.rectangle((x0 + i * period, y0, x0 + i * period + period / 2, y0 + 2 * r), fill=fg)
                elif cls == "checkerboard" and (i + j) % 2 == 0:
                    d.rectangle((a, b, a + period, b + period), fill=fg)
                elif cls == "dots":
                    q = period * 0.3
                    m = period / 2
                    d.ellipse((a + m - q, b + m - q, a + m + q, b + m + q), fill=fg)
    elif cls == "spiral":
        turns, rot = rng.uniform(2.0, 3.0), rng.uniform(0, 2 * math.pi)
        ts = np.linspace(0, 2 * math.pi * turns, 120)
        rad = r * ts / (2 * math.pi * turns)
        pts = list(zip(cx + rad * np.cos(ts + rot), cy + rad * np.sin(ts + rot), strict=True))
        d.line(pts, fill=fg, width=max(1, line // 2))
    elif cls == "zigzag":
        k = int(rng.integers(3, 6))
        pts = [(cx - r + 2 * r * i / k, cy + (r * 0.6 if i % 2 else -r * 0.6)) for i in range(k + 1)]
        d.line(pts, fill=fg, width=line, joint="curve")
    else:  # pragma: no cover - guarded by CLASSES
        raise AssertionError(cls)


def draw_image(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``cls`` (a name in :data:`CLASSES`)."""
    bg = _background(rng, size)
    fg = _foreground(rng, bg.reshape(-1, 3).mean(0))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    _draw(cls, ImageDraw.Draw(img), rng, size, fg)
    return img


def encode(img: Image.Image, index: int, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encode as JPEG (quality 75–95), or 1 in 10 as PNG in RGB, grey (L) or palette (P) mode."""
    buf = io.BytesIO()
    if index % 10 == 7:
        mode = ("RGB", "L", "P")[(index // 10) % 3]
        out = img.convert(mode) if mode != "P" else img.quantize(64)
        out.save(buf, "PNG", compress_level=1)
        return buf.getvalue(), "png"
    img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue(), "jpg"


def make_item(index: int, label: int, size: int, seed: int, class_names: tuple[str, ...]) -> tuple[bytes, str]:
    """Bytes and extension of item ``index`` (deterministic in ``seed`` and ``index``)."""
    rng = np.random.default_rng([seed, index])
    return encode(draw_image(class_names[label], size, rng), index, rng)


# ---- writing ------------------------------------------------------------------------------------------------
class _Writer:
    """Writes objects under a root URI (local or s3://) with a small thread pool (S3 latency)."""

    def __init__(self, root: str, s3_endpoint: str | None = None, threads: int = 8):
        self.fs, self.root = filesystem_for(root, s3_endpoint)
        self.pool = ThreadPoolExecutor(threads)
        self.pending: list = []
        self._made: set[str] = set()

    def put(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        parent = path.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.create_dir(parent, recursive=True)
            self._made.add(parent)
        self.pending.append(self.pool.submit(self._write, path, data))
        if len(self.pending) > 64:
            self.pending.pop(0).result()

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def close(self) -> None:
        for p in self.pending:
            p.result()
        self.pool.shutdown()


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[], None] | None]:
    """A tqdm bar of ``total`` images while the block runs: yields its ``update`` (``None`` when not ``enabled``)."""
    if not enabled:
        yield None
        return
    import shutil

    from tqdm import tqdm

    # A terminal that reports 0 × 0 (a pty nobody sized) would get tqdm's bar at width 0 and hidden below row 0.
    size = shutil.get_terminal_size()  # COLUMNS / LINES, else the terminal's size, else 80 × 24
    bar = tqdm(total=total, desc=desc, unit="img", leave=False, ncols=size.columns, nrows=size.lines)
    try:
        yield bar.update
    finally:
        bar.close()


def write_items(
    out: str,
    fmt: str,
    items: Iterator[tuple[str, bytes, str, int]],
    class_names: list[str],
    *,
    shard_size: int = 256,
    s3_endpoint: str | None = None,
    on_item: Callable[[], None] | None = None,
) -> int:
    """Write ``(key, bytes, ext, label)`` items under ``out`` in format ``fmt``; returns the number written.

    The format's ``writer`` lays them out (each module of :mod:`mae_service.data.formats` says how); the sharded
    formats put ``shard_size`` items in a shard and write ``out/_index.json``.
    """
    item_format = formats.get(fmt, what=f"format {fmt!r}")
    store = _Writer(out, s3_endpoint)
    n = 0
    try:
        writer = item_format.writer(store.put, class_names, shard_size=shard_size)
        for key, data, ext, label in items:
            writer.add(key, data, ext, label)
            n += 1
            if on_item:
                on_item()
        writer.close()
    finally:
        store.close()
    return n


def synthesize(
    out: str,
    *,
    num_images: int = 1000,
    image_size: int = 64,
    classes: int = 12,
    fmt: str = formats.FOLDER,
    seed: int = 0,
    val_fraction: float = 0.0,
    shard_size: int = 256,
    s3_endpoint: str | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Write a synthetic labelled image set; returns ``{split: count}``.

    With ``val_fraction > 0`` the images go to ``out/train`` and ``out/val`` (class-balanced split), otherwise
    straight under ``out``. Labels are balanced: image i has class i mod ``classes``.
    """
    _check(num_images, image_size, classes, fmt, val_fraction, shard_size)
    names = CLASSES[:classes]
    labels = np.arange(num_images) % classes  # balanced; any prefix (the val split) is balanced too
    n_val = int(round(num_images * val_fraction))
    splits = {"val": range(n_val), "train": range(n_val, num_images)} if n_val else {"": range(num_images)}

    def gen(idx: range) -> Iterator[tuple[str, bytes, str, int]]:
        for i in idx:
            lab = int(labels[i])
            data, ext = make_item(i, lab, image_size, seed, names)
            yield f"{names[lab]}_{i:07d}", data, ext, lab

    counts = {}
    with progress_bar(num_images, f"synth {fmt}", progress) as on_item:
        for split, idx in splits.items():
            target = join(out, split) if split else out
            counts[split or "all"] = write_items(
                target, fmt, gen(idx), list(names), shard_size=shard_size, s3_endpoint=s3_endpoint, on_item=on_item
            )
    logger.info("wrote %s synthetic images (%d classes, %dpx, %s) to %s", counts, classes, image_size, fmt, out)
    return counts


def _check(num_images: int, image_size: int, classes: int, fmt: str, val_fraction: float, shard_size: int) -> None:
    """ValueError naming every bad argument of :func:`synthesize` (as the CLI flags)."""
    problems = []
    if num_images < 1:
        problems.append(f"--num-images={num_images}: must be ≥ 1")
    if image_size < 8:
        problems.append(f"--image-size={image_size}: must be ≥ 8")
    if not 1 <= classes <= len(CLASSES):
        problems.append(f"--classes={classes}: must be between 1 and {len(CLASSES)}")
    if fmt not in formats.NAMES:
        problems.append(f"--format={fmt!r}: allowed {', '.join(formats.NAMES)}")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"--val-fraction={val_fraction}: must be in [0, 1)")
    if shard_size < 1:
        problems.append(f"--shard-size={shard_size}: must be ≥ 1")
    if problems:
        raise ValueError("; ".join(problems))
