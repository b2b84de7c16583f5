"""Data pipeline throughput and memory, against the ideal measured in the same run.

What it measures (1,000 synthetic 256² JPEGs by default, 224² RandomResizedCrop + flip):

1. **Ideal**: single-process decode + crop rate (bytes already in memory), i.e. the decode rate per core; the
   ideal for Ray Data is that rate × the CPUs given to Ray Data. Also the JPEG draft-mode gain on large
   (1024²) photos, where it matters.
2. **Ray Data** images/s of ``train_dataset`` (the trainer's path) for loose files and WebDataset tars, from a
   local folder and from a local S3 server (moto on 127.0.0.1, sharing the same cores), as a fraction of the
   ideal; S3 / local ratio.
3. **Streaming**: several epochs (bytes ≫ the object store) through an object store of ``--store-mb``; peak
   object store use, spilled bytes, peak proportional memory (PSS) of the driver and all Ray processes.

Run under the heavy-work lock (2 cores are shared): ``flock /tmp/mae_heavy.lock .venv/bin/python
benchmarks/data_pipeline.py``. Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_service.runtime import offline_defaults  # noqa: E402 - needs the sys.path line above

offline_defaults()


def make_items(n: int, size: int, seed: int = 0):
    """``(key, jpeg bytes, 'jpg', label)`` for n synthetic images (JPEG only, quality 90)."""
    from mae_service.data.synth import CLASSES, draw_image

    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        buf = io.BytesIO()
        draw_image(CLASSES[i % 12], size, rng).save(buf, "JPEG", quality=90)
        out.append((f"{CLASSES[i % 12]}_{i:06d}", buf.getvalue(), "jpg", i % 12))
    return out


def single_process_rate(blobs: list[bytes], crop: int, repeats: int = 2) -> float:
    from mae_service.data.decode import item_rng, random_resized_crop

    best = 0.0
    for r in range(repeats):
        t = time.perf_counter()
        for i, b in enumerate(blobs):
            random_resized_crop(b, crop, item_rng(r, 0, i))
        best = max(best, len(blobs) / (time.perf_counter() - t))
    return best


def _decode_all(args: tuple[list[bytes], int]) -> tuple[float, float]:
    blobs, crop = args
    from mae_service.data.decode import item_rng, random_resized_crop

    t = time.perf_counter()
    for i, b in enumerate(blobs):
        random_resized_crop(b, crop, item_rng(0, 0, i))
    return t, time.perf_counter()


def parallel_rate(blobs: list[bytes], crop: int, procs: int) -> float:
    """``procs`` plain processes decoding at once (no Ray): what this host's cores really give together."""
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(procs)  # not fork: the parent runs Ray's threads
    try:
        pool.map(_decode_all, [(blobs[:50], crop)] * procs)  # warm up
        spans = pool.map(_decode_all, [(blobs, crop)] * procs)
    finally:
        pool.close()
        pool.join()
    return procs * len(blobs) / (max(e for _, e in spans) - min(s for s, _ in spans))


def draft_gain(crop: int, n: int = 40) -> dict[str, float]:
    """Decode + crop rate on 1024² JPEGs with and without reduced-scale (draft) decoding."""
    from PIL import Image

    from mae_service.data.decode import decode_image, item_rng, random_resized_crop, sample_crop

    blobs = [b for _, b, _, _ in make_items(n, 1024, seed=9)]
    t = time.perf_counter()
    for i, b in enumerate(blobs):
        random_resized_crop(b, crop, item_rng(0, 0, i))
    with_draft = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i, b in enumerate(blobs):
        rng = item_rng(0, 0, i)
        left, top, w, h = sample_crop(1024, 1024, rng)
        decode_image(b).resize((crop, crop), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    without = n / (time.perf_counter() - t)
    return {"img_s_draft": with_draft, "img_s_full_decode": without, "speedup": with_draft / without}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (the consumer), Ray's decode workers, and Ray's own services."""
    import psutil

    me = psutil.Process()
    out = {"driver": sum(me.cpu_times()[:2]), "workers": 0.0, "ray_services": 0.0}
    for p in me.children(recursive=True):
        try:
            name = " ".join(p.cmdline()[:2]) or p.name()
            t = sum(p.cpu_times()[:2])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "moto" in name:
            out["s3_server"] = out.get("s3_server", 0.0) + t
        elif name.startswith("ray::") or "default_worker.py" in name:
            out["workers"] += t
        else:
            out["ray_services"] += t
    return out


def ray_rate(uri: str, fmt: str, crop: int, epochs: int, decode_cpus: float) -> dict[str, float]:
    from mae_service.data import open_source, train_dataset

    t0 = time.perf_counter()
    src = open_source(uri, fmt)
    t_list = time.perf_counter() - t0
    ds = train_dataset(
        src, rank=0, world_size=1, image_size=crop, seed=0, batch_size=8, epochs=epochs, decode_cpus=decode_cpus
    )
    n = n_warm = 0
    cpu0 = cpu_seconds()
    t = time.perf_counter()
    first = t_warm = None
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2):
        n += len(batch["image"])
        if first is None:
            first = time.perf_counter() - t
        if t_warm is None and n >= src.num_images // 2:  # steady state: after the ramp-up (first half epoch)
            t_warm, n_warm = time.perf_counter(), n
    end = time.perf_counter()
    cpu1 = cpu_seconds()
    cpu = {f"cpu_{k}": (cpu1[k] - cpu0.get(k, 0.0)) / (end - t) for k in cpu1}  # cores busy, on average
    steady = (n - n_warm) / (end - t_warm) if t_warm and end > t_warm else n / (end - t)
    return {
        "images": n,
        "seconds": end - t,
        "img_s": n / (end - t),
        "steady_img_s": steady,
        "first_batch_s": first or 0.0,
        "list_s": t_list,
        **cpu,
    }


class MemorySampler(threading.Thread):
    """Samples the object store (bytes used, spilled) and the PSS of this process and its children."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.stop_flag = period, threading.Event()
        self.peak_store = self.peak_pss = self.spilled = 0
        self.samples = 0

    def run(self) -> None:
        import psutil
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address()
        me = psutil.Process()
        while not self.stop_flag.is_set():
            try:
                st = get_memory_info_reply(state).store_stats
                self.peak_store = max(self.peak_store, st.object_store_bytes_used)
                self.spilled = max(self.spilled, st.spilled_bytes_total)
            except Exception:  # noqa: BLE001 - best effort
                pass
            pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1
            self.stop_flag.wait(self.period)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument(
        "--cpus",
        type=int,
        nargs="+",
        default=[1, os.cpu_count() or 2],
        help="logical CPUs given to Ray (all for Ray Data), one run each",
    )
    ap.add_argument("--decode-cpus", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per throughput run")
    ap.add_argument("--stream-epochs", type=int, default=6)
    ap.add_argument("--store-mb", type=int, default=256, help="object store size of the streaming run")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import ray

    from mae_service.data.synth import write_items

    res: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_at_start": os.getloadavg()[0],
        "num_images": args.num_images,
        "image_size": args.image_size,
        "crop": args.crop,
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    items = make_items(args.num_images, args.image_size)
    blobs = [b for _, b, _, _ in items]
    res["mean_jpeg_kb"] = sum(map(len, blobs)) / len(blobs) / 1024
    write_items(str(tmp / "files"), "files", iter(items), [f"c{i}" for i in range(12)])
    write_items(str(tmp / "wds"), "wds", iter(items), [f"c{i}" for i in range(12)], shard_size=100)

    print(f"decode rate per core ({args.image_size}² JPEG → {args.crop}² crop) ...", file=sys.stderr)
    per_core = single_process_rate(blobs, args.crop, repeats=3)
    res["decode_img_s_per_core"] = per_core
    res["draft_1024"] = draft_gain(args.crop)

    s3 = None
    runs = {"files local": (str(tmp / "files"), "files"), "wds local": (str(tmp / "wds"), "wds")}
    if not args.skip_s3:
        from tests.servers import S3Server

        s3 = S3Server(tmp)
        os.environ.update(s3.env)
        s3.make_bucket("bench")
        write_items("s3://bench/files", "files", iter(items), [f"c{i}" for i in range(12)])
        write_items("s3://bench/wds", "wds", iter(items), [f"c{i}" for i in range(12)], shard_size=100)
        runs.update({"files s3": ("s3://bench/files", "files"), "wds s3": ("s3://bench/wds", "wds")})
    try:
        res["ray"] = {}
        for cpus in args.cpus:
            ray.init(
                num_cpus=cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                object_store_memory=512 << 20,
                log_to_driver=False,
            )
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray_rate(str(tmp / "files"), "files", args.crop, 1, args.decode_cpus)  # warm up the worker processes
            ideal = single_process_rate(blobs, args.crop, repeats=3) * cpus  # re-measured beside each run: noisy host
            res[f"parallel_{cpus}_procs_img_s"] = parallel_rate(blobs, args.crop, cpus)
            for name, (uri, fmt) in runs.items():
                print(f"Ray Data ({cpus} CPUs): {name} ...", file=sys.stderr)
                r = ray_rate(uri, fmt, args.crop, args.epochs, args.decode_cpus)
                r.update(
                    cpus=cpus, ideal_img_s=ideal, of_ideal=r["img_s"] / ideal, steady_of_ideal=r["steady_img_s"] / ideal
                )
                res["ray"][f"{name} / {cpus} cpu"] = r
            for kind in ("files", "wds"):
                if f"{kind} s3 / {cpus} cpu" in res["ray"]:
                    res[f"s3_over_local_{kind}_{cpus}cpu"] = (
                        res["ray"][f"{kind} s3 / {cpus} cpu"]["steady_img_s"]
                        / res["ray"][f"{kind} local / {cpus} cpu"]["steady_img_s"]
                    )
            ray.shutdown()

        print(f"streaming {args.stream_epochs} epochs through a {args.store_mb} MiB object store ...", file=sys.stderr)
        ray.init(
            num_cpus=max(args.cpus),
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            object_store_memory=args.store_mb << 20,
            log_to_driver=False,
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        baseline = MemorySampler()
        baseline.start()
        time.sleep(2)
        baseline.stop()
        sampler = MemorySampler()
        sampler.start()
        r = ray_rate(str(tmp / "files"), "files", args.crop, args.stream_epochs, args.decode_cpus)
        sampler.stop()
        ray.shutdown()
        res["stream"] = {
            **r,
            "decoded_mib": r["images"] * 3 * args.crop**2 / 2**20,
            "store_mib": args.store_mb,
            "peak_store_mib": sampler.peak_store / 2**20,
            "spilled_mib": sampler.spilled / 2**20,
            "peak_pss_mib": sampler.peak_pss / 2**20,
            "idle_pss_mib": baseline.peak_pss / 2**20,
            "samples": sampler.samples,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if s3 is not None:
            s3.stop()

    print(
        f"\nmachine: {res['machine']} (load average {res['load_avg_at_start']:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end); {args.num_images} × {args.image_size}² JPEG "
        f"({res['mean_jpeg_kb']:.0f} KiB avg) → {args.crop}² crop"
    )
    print(f"decode+crop, one process: {per_core:.0f} img/s per core")
    d = res["draft_1024"]
    print(
        f"1024² JPEG → {args.crop}²: {d['img_s_draft']:.0f} img/s with draft vs {d['img_s_full_decode']:.0f} "
        f"full decode ({d['speedup']:.1f}×)"
    )
    print(
        f"{'source / CPUs for Ray':<22}{'ideal':>7}{'img/s':>7}{'steady':>8}{'of ideal':>9}{'steady/ideal':>13}"
        f"{'1st batch s':>12}{'list s':>7}  cores busy: workers/driver/ray/s3"
    )
    for name, r in res["ray"].items():
        print(
            f"{name:<22}{r['ideal_img_s']:>7.0f}{r['img_s']:>7.0f}{r['steady_img_s']:>8.0f}{r['of_ideal']:>9.2f}"
            f"{r['steady_of_ideal']:>13.2f}{r['first_batch_s']:>12.2f}{r['list_s']:>7.2f}  {r['cpu_workers']:.2f}/"
            f"{r['cpu_driver']:.2f}/{r['cpu_ray_services']:.2f}/{r.get('cpu_s3_server', 0.0):.2f}"
        )
    for key, v in res.items():
        if key.startswith("parallel_"):
            n = int(key.split("_")[1])
            print(f"{n} plain processes decoding at once (no Ray): {v:.0f} img/s = {v / per_core:.2f} × one process")
        if key.startswith("s3_over_local"):
            print(f"{key} (steady): {v:.2f}")
    s = res["stream"]
    print(
        f"streaming: {s['images']} images ({s['decoded_mib']:.0f} MiB decoded) through a {s['store_mib']} MiB "
        f"object store at {s['img_s']:.0f} img/s: peak store {s['peak_store_mib']:.0f} MiB, spilled "
        f"{s['spilled_mib']:.0f} MiB, peak PSS (driver + Ray) {s['peak_pss_mib']:.0f} MiB (idle Ray: "
        f"{s['idle_pss_mib']:.0f} MiB)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
