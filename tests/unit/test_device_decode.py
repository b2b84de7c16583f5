"""The worker-side decode path (``data.decode_device=cuda``), run with ``device="cpu"``: the same crops as the CPU
path, pixels close to PIL's, bad objects replaced and counted, and the fetch-only stream it consumes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mae_service.data import pipeline as P
from mae_service.data.decode import item_rng, random_resized_crop, sample_crop
from mae_service.data.synth import synthesize
from mae_service.train.device_decode import _decode_jpegs, decode_batch
from tests.unit.test_decode import MODE_CASES, bad_objects


def photo(w: int, h: int, seed: int = 0) -> bytes:
    """A smooth, structured JPEG (so crops of different places differ clearly)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    rgb = [
        127 + 120 * np.sin(x / rng.uniform(9, 30) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(9, 30)) for _ in "rgb"
    ]
    buf = io.BytesIO()
    Image.fromarray(np.stack(rgb, -1).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_shapes_and_dtypes_jpeg_and_png():
    datas = [photo(320, 240), photo(97, 131, 1), MODE_CASES["RGB-png"](), MODE_CASES["L-jpeg"]()]
    out, n_bad = decode_batch(datas, [0, 1, 2, 3], [0, 0, 0, 0], seed=0, size=32, device="cpu")
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8 and out.device.type == "cpu"
    assert n_bad.tolist() == [0, 0, 0, 0]
    assert out.float().std() > 5, "real pixels, not a blank batch"


def test_decoded_jpeg_matches_pil_within_one_level_on_average():
    """Tolerance: mean |Δ| ≤ 1.0 and max |Δ| ≤ 16 levels (8-bit) between torchvision's decode and PIL's full decode
    (both libjpeg-turbo, different upsampling/IDCT settings)."""
    data = photo(300, 200, 3)
    (t,) = _decode_jpegs([data], torch.device("cpu"))
    assert t is not None
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).astype(np.int16)
    diff = np.abs(t.numpy().astype(np.int16) - ref)
    assert t.shape == (3, 200, 300) and diff.mean() <= 1.0 and diff.max() <= 16, (diff.mean(), diff.max())


def test_same_crop_parameters_as_the_cpu_path():
    """The device path draws (left, top, w, h, flip) from the decoded size with the item's RNG, the CPU path from the
    header size with the same RNG: identical for every item, and their distribution is RandomResizedCrop's."""
    data = photo(400, 300, 4)
    (t,) = _decode_jpegs([data], torch.device("cpu"))
    assert t is not None and (t.shape[2], t.shape[1]) == Image.open(io.BytesIO(data)).size
    area, log_ratio, flips = [], [], []
    for i in range(3000):
        a, b = item_rng(7, 1, i), item_rng(7, 1, i)
        dev = (*sample_crop(t.shape[2], t.shape[1], a), a.random() < 0.5)
        cpu = (*sample_crop(*Image.open(io.BytesIO(data)).size, b), b.random() < 0.5)
        assert dev == cpu
        area.append(dev[2] * dev[3] / (400 * 300))
        log_ratio.append(math.log(dev[2] / dev[3]))
        flips.append(dev[4])
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(t, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3]) for _ in range(3000)]
    ref_area = [h * w / (400 * 300) for _, _, h, w in ref]
    assert 0.2 - 0.01 <= min(area) and max(area) <= 1.0
    assert abs(np.mean(area) - np.mean(ref_area)) < 0.02 and abs(np.std(area) - np.std(ref_area)) < 0.02
    assert abs(np.mean(flips) - 0.5) < 0.03
    ref_ratio = [math.log(w / h) for _, _, h, w in ref]
    assert abs(np.mean(log_ratio) - np.mean(ref_ratio)) < 0.02
    assert max(abs(r) for r in log_ratio) <= math.log(4 / 3) + 0.01


def test_crops_match_the_cpu_path_pixel_for_pixel_within_tolerance():
    """Same item → same crop on both paths: mean |Δ| per image ≤ 6 levels (resampling and PIL's reduced-scale JPEG
    decode differ); a different item's crop is much further away (the check can fail)."""
    data = photo(640, 480, 5)
    n = 24
    dev, n_bad = decode_batch([data] * n, list(range(n)), [0] * n, seed=3, size=48, device="cpu")
    cpu = np.stack([random_resized_crop(data, 48, item_rng(3, 0, i)) for i in range(n)]).astype(np.int16)
    same = np.abs(dev.numpy().astype(np.int16) - cpu).mean(axis=(1, 2, 3))
    other = np.abs(dev.numpy().astype(np.int16) - np.roll(cpu, 1, axis=0)).mean(axis=(1, 2, 3))
    assert n_bad.sum() == 0
    assert same.max() <= 6, same
    assert np.median(other) > 3 * np.median(same), (same, other)


def test_bad_objects_are_replaced_and_counted():
    bad = bad_objects()
    datas = [photo(64, 64), bad["truncated.jpg"], bad["text.jpg"], MODE_CASES["RGB-png"](), bad["empty.jpg"]]
    out, n_bad = decode_batch(datas, [0, 1, 2, 3, 4], [0] * 5, seed=0, size=16, device="cpu")
    assert n_bad.tolist() == [0, 1, 1, 0, 1]
    assert out.shape == (5, 3, 16, 16)
    with pytest.raises(RuntimeError, match="no decodable image"):
        decode_batch([bad["text.jpg"], b""], [0, 1], [0, 0], seed=0, size=16, device="cpu")


def test_fetch_only_stream_feeds_the_device_decoder(tmp_path):
    """A ``cuda`` job's tasks yield bytes (headers checked: a zero-byte object is still replaced there) that decode
    on the worker to the CPU path's crops."""
    synthesize(str(tmp_path / "img"), num_images=12, image_size=40, classes=3, seed=2)
    (tmp_path / "img" / "circle" / "zero.jpg").write_bytes(b"")
    from mae_service.data.source import open_source

    src = open_source(str(tmp_path / "img"), "files", shard_size=5)
    cpu, raw = (
        P.train_job(src, rank=0, world_size=1, image_size=16, seed=0, batch_size=1, epochs=1, decode_device=d)
        for d in ("cpu", "cuda")
    )
    fs = P._filesystem(src.uri, None)
    rows = {
        k: [b for u in range(len(job.units)) for b in P._process_unit(job, fs, u)]
        for k, job in (("c", cpu), ("r", raw))
    }
    c = {k: np.concatenate([b[k] for b in rows["c"]]) for k in rows["c"][0]}
    r = {k: np.concatenate([b[k] for b in rows["r"]]) for k in rows["r"][0]}
    assert set(r) == {"data", "item_id", "label", "epoch", "n_bad"} and len(r["data"]) == 13
    assert r["n_bad"].sum() == c["n_bad"].sum() == 1 and (r["label"] == c["label"]).all()
    images, bad_here = decode_batch(list(r["data"]), r["item_id"], r["epoch"], seed=0, size=16, device="cpu")
    assert bad_here.sum() == 0
    assert np.abs(images.numpy().astype(np.int16) - c["image"].astype(np.int16)).mean() <= 8


def test_unknown_decode_device_names_the_value():
    from mae_service.data.source import Shard, Source

    src = Source("mem://", "wds", [Shard("s", 10)])
    with pytest.raises(ValueError, match="decode_device='gpu'.*cpu, cuda"):
        P.train_job(src, rank=0, world_size=1, image_size=8, seed=0, batch_size=1, epochs=1, decode_device="gpu")


def test_gpu_scripts_refuse_to_run_without_cuda_outside_smoke():
    """benchmarks/gpu_step.py and gpu_trainer.py exit 2 with a clear line when torch sees no GPU (they only run
    for real on a CUDA machine; ``--smoke`` checks them anywhere)."""
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path does not apply")
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    for name in ("gpu_step", "gpu_trainer"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", root / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.main([]) == 2, name
