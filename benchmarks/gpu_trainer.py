"""The full trainer on one GPU fed by Ray Data, with CPU decode and with GPU decode: img/s and data-wait.

    .venv/bin/python benchmarks/gpu_trainer.py --json out.json     # on a CUDA machine (~3 min)
    .venv/bin/python benchmarks/gpu_trainer.py --smoke             # anywhere: tiny model, 2 steps, CPU decode only

Writes ``--images`` synthetic JPEGs (``--src-size``² px, files layout) to a temporary folder, then runs
``mae_service.train.driver.pretrain`` on a local Ray with one worker (``train.use_gpu=true``) for ``--steps``
optimiser steps, once with ``data.decode_device=cpu`` (Ray Data tasks decode and crop, ``data.decode_cpus`` each)
and once with ``cuda`` (tasks only fetch; the worker decodes with nvjpeg). Reports the median ``images_per_s`` and
``data_wait_frac`` after the first 5 steps, read back from the run's MLflow store. Compare with
``gpu_step.py``'s model-only img/s for the same model (target: trainer ≥ 0.9 × model-only). Without CUDA (and
without ``--smoke``) it exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_service.runtime import offline_defaults  # noqa: E402 - needs the sys.path line above

offline_defaults()


def run(tmp: Path, data: Path, decode_device: str, args: argparse.Namespace, smoke: bool) -> dict:
    import mlflow

    from mae_service.config import build_config
    from mae_service.train.driver import pretrain

    name = f"gpu-{decode_device}"
    overrides = [
        f"model.name={args.model}",
        f"data.image_size={32 if smoke else 224}",
        f"data.train_uri={data}",
        f"data.decode_device={decode_device}",
        f"data.decode_cpus={args.decode_cpus}",
        "train.num_workers=1",
        f"train.use_gpu={'false' if smoke else 'true'}",
        f"train.cpus_per_worker={1 if smoke else 2}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        "train.epochs=100",
        "train.warmup_epochs=0",
        "train.amp=bf16",
        f"train.compile={'false' if smoke else str(args.compile).lower()}",
        f"train.storage_path={tmp / 'ck'}",
        f"train.run_name={name}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"mlflow.experiment={name}",
        "registry.register=false",
        "train.checkpoint_every_steps=100000",
        "train.picture_every_steps=100000",
        "mlflow.log_system_metrics=false",
    ]
    if smoke:
        overrides += ["model.patch_size=8", "model.decoder_embed_dim=32", "model.decoder_depth=1"]
        overrides += ["model.decoder_num_heads=2"]
    cfg = build_config({}, overrides)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")

    def series(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)]

    ips, wait = series("images_per_s"), series("data_wait_frac")
    skip = 0 if smoke else 5
    return {
        "decode_device": decode_device,
        "steps": len(ips),
        "img_per_s": round(statistics.median(ips[skip:] or ips), 1),
        "data_wait_frac": round(statistics.median(wait[skip:] or wait), 3),
        "wall_s": round(wall, 1),
        "bad_objects": series("bad_objects")[-1:] or [0.0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--src-size", type=int, default=320, help="side of the synthetic JPEGs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--decode-cpus", type=float, default=1.0)
    p.add_argument("--compile", action="store_true", help="train.compile=true (adds its compile time to the run)")
    p.add_argument("--devices", default="cpu,cuda", help="decode devices to run, comma-separated")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_trainer.py: no CUDA device (torch.cuda.is_available() is False); use --smoke on CPU")
        return 2
    if args.smoke:
        args.model, args.images, args.src_size, args.batch, args.steps = "mae_vit_tiny_patch16", 32, 48, 8, 2
    from mae_service.data.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="mae-gpu-trainer-"))
    t0 = time.perf_counter()
    synthesize(str(tmp / "data"), num_images=args.images, image_size=args.src_size, classes=10, seed=0)
    out: dict = {"model": args.model, "batch": args.batch, "images": args.images, "src_size": args.src_size}
    out["synth_s"] = round(time.perf_counter() - t0, 1)
    out["cpus"] = os.cpu_count()
    out["runs"] = []
    devices = ["cpu"] if args.smoke else args.devices.split(",")
    import ray

    # every core for Ray (mae_service's own init_ray asks for the run's minimum, 4 here); loopback only
    ray.init(num_cpus=max(4, os.cpu_count() or 4), _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        for d in devices:
            try:
                out["runs"].append(run(tmp, tmp / "data", d, args, args.smoke))
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the other's figures
                out["runs"].append({"decode_device": d, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(json.dumps(out["runs"][-1]), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if all("error" not in r for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
