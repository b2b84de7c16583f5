"""JPEG decode + RandomResizedCrop(224) + flip, per CPU core and per GPU: what sizes the decode groups.

    flock /tmp/mae_heavy.lock .venv/bin/python benchmarks/decode.py                  # ~1 min on CPU
    PYTHONPATH=/path/to/simplejpeg .venv/bin/python benchmarks/decode.py           # adds simplejpeg if importable

Images: ``--images`` synthetic photos (smooth structure + sensor-like noise, so they compress like photographs,
~0.1-0.2 bit/px less than ImageNet's) at ``--size`` (default 500x375, ImageNet's median; ``--size 1024x768`` for
larger photos), JPEG quality 90. Every variant draws the same crops (``mae_service.data.decode.sample_crop`` with
the item's RNG) and outputs uint8 ``[3, 224, 224]``; one process, one thread (``torch.set_num_threads(1)``), so
img/s is **per core**:

- ``pil-draft`` — today's CPU path (:func:`mae_service.data.decode.random_resized_crop`: PIL, DCT-scaled decode
  when the crop allows it, bicubic resize);
- ``pil-full`` — the same without the reduced-scale decode (what the draft saves);
- ``tv-cpu`` — the worker-side path on CPU (:func:`mae_service.train.device_decode.decode_batch`,
  ``torchvision.io.decode_jpeg`` + torch bicubic antialiased resize), batches of ``--batch``;
- ``simplejpeg`` — libjpeg-turbo via simplejpeg (if importable) with the same DCT scale as the draft, crop and
  PIL resize;
- ``nvjpeg`` — ``decode_batch(device="cuda")`` (batched nvjpeg + resize on the GPU), img/s per GPU, when CUDA is
  present.

Prints one JSON object (and writes ``--json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np


def photos(n: int, w: int, h: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            for _ in range(4):
                fx, fy, ph = rng.uniform(0.005, 0.08, 2).tolist() + [rng.uniform(0, 6.3)]
                img[..., c] += 40 * np.sin(x * fx + ph) * np.cos(y * fy)
        img += 128 + rng.normal(0, 6, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rate(fn, datas: list[bytes], min_s: float) -> float:
    fn(datas[:4])  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn(datas)
        done += len(datas)
    return done / (time.perf_counter() - t0)


def pil_draft(datas, size=224):
    from mae_service.data.decode import item_rng, random_resized_crop

    for i, d in enumerate(datas):
        random_resized_crop(d, size, item_rng(0, 0, i))


def pil_full(datas, size=224):
    from PIL import Image

    from mae_service.data.decode import item_rng, open_image, sample_crop

    for i, d in enumerate(datas):
        img = open_image(d)
        rng = item_rng(0, 0, i)
        left, top, w, h = sample_crop(*img.size, rng)
        out = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        np.asarray(out)


def simplejpeg_scaled(datas, size=224):
    import simplejpeg
    from PIL import Image

    from mae_service.data.decode import draft_scale, item_rng, sample_crop

    for i, d in enumerate(datas):
        hh, ww, _, _ = simplejpeg.decode_jpeg_header(d)
        rng = item_rng(0, 0, i)
        left, top, w, h = sample_crop(ww, hh, rng)
        s = draft_scale(w, h, size)
        a = simplejpeg.decode_jpeg(d, min_height=-(-hh // s), min_width=-(-ww // s))
        sx, sy = a.shape[1] / ww, a.shape[0] / hh
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        out = Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        np.asarray(out)


def device_path(device: str, batch: int, size=224):
    import torch

    from mae_service.train.device_decode import decode_batch

    def run(datas):
        for s in range(0, len(datas), batch):
            chunk = datas[s : s + batch]
            out, _ = decode_batch(chunk, range(s, s + len(chunk)), [0] * len(chunk), seed=0, size=size, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", default="500x375")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-s", type=float, default=4.0, help="seconds each variant runs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.split("x"))
    datas = photos(args.images, w, h)
    result: dict = {
        "size": args.size,
        "mean_kb": round(sum(map(len, datas)) / len(datas) / 1024, 1),
        "bits_per_px": round(8 * sum(map(len, datas)) / len(datas) / (w * h), 2),
        "img_per_s": {},
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    variants = {"pil-draft": pil_draft, "pil-full": pil_full, "tv-cpu": device_path("cpu", args.batch)}
    try:
        import simplejpeg  # noqa: F401

        variants["simplejpeg"] = simplejpeg_scaled
    except ImportError:
        result["simplejpeg"] = "not installed"
    if torch.cuda.is_available():
        variants["nvjpeg"] = device_path("cuda", args.batch)
        result["gpu"] = torch.cuda.get_device_name()
    for name, fn in variants.items():
        rates = [_rate(fn, datas, args.min_s / 2) for _ in range(2)]  # best of two: the host may be shared
        result["img_per_s"][name] = round(max(rates), 1)
    base = result["img_per_s"]["pil-draft"]
    result["x_pil_draft"] = {k: round(v / base, 2) for k, v in result["img_per_s"].items()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
