"""Decoding on the training worker's device (``data.decode_device=cuda``): encoded bytes → the same
RandomResizedCrop + flip as the CPU path → uint8 ``[B, 3, S, S]`` on the device.

The Ray Data tasks then only fetch objects and check their headers (:mod:`mae_service.data.pipeline`, ``raw``
jobs), which takes a CPU core a fraction of decoding's time. Here, per batch:

- JPEGs are decoded together with ``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg's batched decode on
  CUDA; libjpeg-turbo on CPU, which is how the tests run this same code);
- the crop and flip come from :func:`mae_service.data.decode.sample_crop` with the item's
  :func:`~mae_service.data.decode.item_rng`, drawn on the full image size exactly as the CPU path draws them from the
  header: the same parameters for the same ``(seed, epoch, item id)``, so the same distribution (scale 0.2–1,
  ratio 3/4–4/3, flip ½);
- each crop is resized to ``S × S`` (bicubic, antialiased, like PIL's) and flipped on the device;
- other formats (PNG, WebP, ...), and JPEGs the batched decoder rejects, go through the CPU path
  (:func:`~mae_service.data.decode.random_resized_crop`, same RNG); bytes no decoder reads are bad objects:
  replaced by another good row of the batch, cropped with the bad item's RNG, and counted in ``n_bad``.

Pixels differ from the CPU path's by the decoders' rounding and because PIL decodes large JPEGs at a reduced DCT
scale (``draft``); the tests bound the difference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mae_service.data.decode import BadImageError, item_rng, random_resized_crop, sample_crop

logger = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_MAGIC


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to uint8 ``[3, H, W]`` on ``device``, batched; None for those the decoder rejects."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(out)
    except RuntimeError:  # one bad JPEG fails the batch: decode one by one to find it
        single: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                single.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                single.append(None)
        return single


def crop_resize_flip(img: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """RandomResizedCrop (parameters as :func:`~mae_service.data.decode.sample_crop` draws them) + horizontal flip
    of a uint8 ``[3, H, W]`` tensor → uint8 ``[3, size, size]`` on the same device."""
    _, h_full, w_full = img.shape
    left, top, w, h = sample_crop(w_full, h_full, rng)
    flip = rng.random() < 0.5
    crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    return out.flip(-1) if flip else out


def decode_batch(
    datas: Sequence[bytes],
    item_ids: Sequence[int],
    epochs: Sequence[int],
    *,
    seed: int,
    size: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images → ``(uint8 [B, 3, size, size] on device, int64 [B] rows replaced because bad)``.

    ``item_ids`` and ``epochs`` seed each row's crop (:func:`~mae_service.data.decode.item_rng`). Raises
    RuntimeError when no row of the batch is decodable.
    """
    device = torch.device(device)
    n = len(datas)
    jpeg = [k for k in range(n) if is_jpeg(datas[k])]
    decoded: dict[int, torch.Tensor | None] = dict(
        zip(jpeg, _decode_jpegs([datas[k] for k in jpeg], device), strict=True)
    )
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    bad: list[int] = []
    for k in range(n):
        rng = item_rng(seed, int(epochs[k]), int(item_ids[k]))
        img = decoded.get(k)
        if img is not None:
            out[k] = crop_resize_flip(img, size, rng)
            continue
        try:  # not a JPEG, or one the batched decoder rejected: the CPU path, same RNG
            out[k] = torch.from_numpy(random_resized_crop(bytes(datas[k]), size, rng)).to(device)
        except BadImageError as e:
            logger.warning("bad image (item %d) skipped on the worker (%s); replacing it in its batch", item_ids[k], e)
            bad.append(k)
    n_bad = torch.zeros(n, dtype=torch.int64)
    if bad:
        good = [k for k in range(n) if k not in set(bad)]
        if not good:
            raise RuntimeError(f"no decodable image in a batch of {n} (items {list(item_ids)[:8]}...)")
        for j, k in enumerate(bad):  # another good row's pixels, re-cropped with the bad item's RNG
            src = good[j % len(good)]
            rng = item_rng(seed, int(epochs[k]), int(item_ids[k]))
            img = decoded.get(src)
            if img is not None:
                out[k] = crop_resize_flip(img, size, rng)
            else:
                out[k] = torch.from_numpy(random_resized_crop(bytes(datas[src]), size, rng)).to(device)
            n_bad[k] = 1
    return out, n_bad


def decoded_batches(batches, *, seed: int, size: int, device: torch.device | str):
    """Numpy batches of a ``raw`` stream (columns ``data``, ``item_id``, ``epoch``, ``label``, ``n_bad``) → the
    batches the training step takes: ``image`` (uint8 on ``device``), ``label``, ``epoch``, ``n_bad`` (tensors;
    ``n_bad`` adds the rows replaced here to those the fetch tasks replaced)."""
    for b in batches:
        images, bad_here = decode_batch(b["data"], b["item_id"], b["epoch"], seed=seed, size=size, device=device)
        yield {
            "image": images,
            "label": torch.tensor(b["label"]),  # copies: Ray's zero-copy arrays are read-only
            "epoch": torch.tensor(b["epoch"]),
            "n_bad": torch.tensor(b["n_bad"]) + bad_here,
        }
