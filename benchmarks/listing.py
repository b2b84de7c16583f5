"""Listing and shipping at scale: open a loose-file dataset with and without its manifest, and what each rank ships.

    flock /tmp/mae_heavy.lock .venv/bin/python benchmarks/listing.py                      # 1M local files, 50k on S3
    .venv/bin/python benchmarks/listing.py --files 20000 --s3-keys 2000 --folders 20      # a quick run

Builds (in a temporary folder on local disk, deleted afterwards) ``--files`` images in ``--folders`` class folders —
hard links to one small JPEG per folder, so they cost a directory entry each, list like real files and decode — and
uploads ``--s3-keys`` objects to a moto S3 server on 127.0.0.1. For each dataset, without and then with its
manifest (``mae-service data index``), a fresh process measures:

- **open s** — ``open_source`` (listing or manifest read, shard grouping);
- **driver peak RSS** — the process's peak resident memory after opening and planning (``ru_maxrss``), and the
  same process's RSS after its imports, before anything was listed;
- **listing MB** — the listing's arrays (``Source.listing_bytes``) and the whole ``Source`` pickled;
- **job per rank** — rank 0's pickled decode job (``train_job``: its units and the shards they read) at
  ``--world`` ranks, one epoch;
- **first batch s** — from ``train_dataset`` to rank 0's first batch of 32 on a local Ray (started before the
  clock runs).

``data index`` itself is timed in the parent. Prints a Markdown table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(uri: str, world: int, first_batch: bool) -> dict:
    """One case, in this (fresh) process."""
    import pickle

    from mae_service.data.pipeline import train_job
    from mae_service.data.source import open_source

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    src = open_source(uri, "files")
    open_s = time.perf_counter() - t0
    jobs = [
        len(pickle.dumps(train_job(src, rank=r, world_size=world, image_size=224, seed=0, batch_size=32, epochs=1)))
        for r in range(world)
    ]
    out = {
        "uri": uri,
        "images": src.num_images,
        "shards": len(src.shards),
        "open_s": round(open_s, 2),
        "rss_after_imports_mb": round(rss0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "listing_mb": round(src.listing_bytes / 1e6, 2),
        "listing_pickled_mb": round(len(pickle.dumps(src)) / 1e6, 2),
        "job_per_rank_mb": round(max(jobs) / 1e6, 3),
        "world": world,
    }
    if first_batch:
        import ray

        from mae_service.data import train_dataset

        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=512 << 20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        ds = train_dataset(src, rank=0, world_size=world, image_size=224, seed=0, batch_size=32, epochs=1)
        next(iter(ds.iter_batches(batch_size=32, batch_format="numpy")))
        out["first_batch_s"] = round(time.perf_counter() - t0, 2)
        ray.shutdown()
    return out


def _child(uri: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--measure", uri, "--world", str(args.world)]
    if args.no_first_batch:
        cmd.append("--no-first-batch")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if res.returncode:
        raise RuntimeError(f"{uri}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _jpeg() -> bytes:
    import io

    import numpy as np

    from mae_service.data.synth import CLASSES, draw_image

    buf = io.BytesIO()
    draw_image(CLASSES[0], 256, np.random.default_rng(0)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_local(root: Path, n: int, folders: int, jpeg: bytes) -> float:
    t0 = time.perf_counter()
    per = -(-n // folders)
    for c in range(folders):
        d = root / f"class_{c:04d}"
        d.mkdir(parents=True)
        first = d / "img_00000000.jpg"
        first.write_bytes(jpeg)
        for i in range(1, min(per, n - c * per)):
            os.link(first, d / f"img_{i:08d}.jpg")
    return time.perf_counter() - t0


def make_s3(s3, bucket: str, n: int, folders: int, jpeg: bytes) -> float:
    s3.make_bucket(bucket)
    client = s3.client()
    per = -(-n // folders)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=f"img/class_{i // per:04d}/img_{i:08d}.jpg", Body=jpeg),
                range(n),
            )
        )
    return time.perf_counter() - t0


def index(uri: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mae_service", "data", "index", uri], env=env, cwd=ROOT, check=True, capture_output=True
    )
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--folders", type=int, default=1000)
    p.add_argument("--s3-keys", type=int, default=50_000)
    p.add_argument("--s3-folders", type=int, default=100)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--no-first-batch", action="store_true")
    p.add_argument("--json", default="benchmarks/listing.json")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.world, not args.no_first_batch)))
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    jpeg = _jpeg()
    rows, made = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="mae-listing-", dir="/var/tmp"))
    try:
        if args.files:
            made["local_create_s"] = round(make_local(tmp / "local", args.files, args.folders, jpeg), 1)
            uri = str(tmp / "local")
            rows.append({"case": f"local {args.files:,}", "manifest": "no", **_child(uri, args, env)})
            made["local_index_s"] = round(index(uri, env), 2)
            rows.append({"case": f"local {args.files:,}", "manifest": "yes", **_child(uri, args, env)})
            shutil.rmtree(tmp / "local")
        if args.s3_keys:
            sys.path.insert(0, str(ROOT))
            from tests.servers import S3Server

            s3 = S3Server(tmp)
            try:
                env3 = {**env, **s3.env}
                made["s3_upload_s"] = round(make_s3(s3, "bench", args.s3_keys, args.s3_folders, jpeg), 1)
                uri = "s3://bench/img"
                rows.append({"case": f"moto S3 {args.s3_keys:,}", "manifest": "no", **_child(uri, args, env3)})
                made["s3_index_s"] = round(index(uri, env3), 2)
                rows.append({"case": f"moto S3 {args.s3_keys:,}", "manifest": "yes", **_child(uri, args, env3)})
            finally:
                s3.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"made": made, "rows": rows, "host": {"cpus": os.cpu_count()}}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(made))
    print(
        "| dataset | manifest | open s | driver peak RSS MB (after imports) | listing MB (pickled) "
        f"| job per rank MB (world {args.world}) | first batch s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['manifest']} | {r['open_s']} | {r['peak_rss_mb']} ({r['rss_after_imports_mb']}) "
            f"| {r['listing_mb']} ({r['listing_pickled_mb']}) | {r['job_per_rank_mb']} | {r.get('first_batch_s', '-')} |"
        )


if __name__ == "__main__":
    main()
