"""Trainer images/s with Ray Data feeding vs. the model-only step on the same config, in one run.

    .venv/bin/python benchmarks/train_throughput.py [--images 2000] [--image-size 64] [--batch 64] [--steps 40]

1. Model-only: the same optimiser step the trainer runs (``mae_service.train.step.optimizer_step``) on random uint8
   batches already in memory, in this process, with the same thread count a Ray Train worker gets
   (``OMP_NUM_THREADS`` = ``train.cpus_per_worker``).
2. Trainer: ``mae_service.train.driver.pretrain`` on a local Ray (one worker, no DDP peer to wait for), data decoded
   and augmented by Ray Data from real JPEG files; its images/s is read back from the MLflow run (median over the
   steps after the first few) together with the fraction of step time spent waiting for data.
3. Fine-tuning (``--finetune``, on by default): the registered encoder of step 2 fine-tuned end to end by
   ``mae_service.finetune.driver.finetune`` on the same machinery (one worker, Ray Data with labels, mixup), its
   images/s and data-wait read back the same way.
Targets: trainer ≥ 0.9 × model-only (data is never the bottleneck); data-wait < 10 % for both trainers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_service.runtime import offline_defaults  # noqa: E402 - needs the sys.path line above

offline_defaults()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="mae_vit_small_patch16")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="model-only steps to time")
    ap.add_argument("--amp", default="auto", help="train.amp for both: auto (bf16 where the CPU has it), bf16, none")
    ap.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning trainer")
    args = ap.parse_args()

    import mlflow
    import torch

    from mae_service.config import build_config
    from mae_service.data.synth import synthesize
    from mae_service.train.driver import pretrain
    from mae_service.train.schedule import make_optimizer
    from mae_service.train.step import build_model, optimizer_step

    tmp = Path(tempfile.mkdtemp(prefix="mae-bench-"))
    synthesize(
        str(tmp / "data"), num_images=args.images, image_size=96, classes=10, fmt="files", seed=0, val_fraction=0.1
    )
    overrides = [
        f"model.name={args.model}",
        f"model.patch_size={args.patch}",
        f"data.image_size={args.image_size}",
        "model.decoder_embed_dim=256",
        "model.decoder_depth=2",
        "model.decoder_num_heads=8",
        "train.num_workers=1",
        f"train.batch_size={args.batch}",
        "train.epochs=1",
        "train.warmup_epochs=0",
        f"data.train_uri={tmp / 'data' / 'train'}",
        f"train.storage_path={tmp / 'ck'}",
        "train.run_name=bench",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"registry.register={'false' if args.no_finetune else 'true'}",
        "registry.model_name=bench-encoder",
        "train.checkpoint_every_steps=100000",
        "train.picture_every_steps=100000",
        "mlflow.log_system_metrics=false",
        f"train.amp={args.amp}",
    ]
    cfg = build_config({}, overrides)

    # 1. model-only, timed before and after the trainer (the host is shared: the two brackets show the drift)
    threads = max(1, int(cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)
    batch = torch.randint(0, 256, (cfg.micro_batch, 3, args.image_size, args.image_size), dtype=torch.uint8)

    def model_only() -> float:
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = make_optimizer(model, lr=1e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        for i in range(3):
            optimizer_step(model, model, opt, scaler, [batch], cfg=cfg, device=torch.device("cpu"), rank=0, step=i)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            optimizer_step(model, model, opt, scaler, [batch], cfg=cfg, device=torch.device("cpu"), rank=0, step=i)
            times.append(time.perf_counter() - t0)
        return cfg.micro_batch / statistics.median(times)  # median step, as for the trainer

    before = model_only()

    # 2. the trainer, fed by Ray Data
    result = pretrain(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")

    def history(run_id: str, key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    ips, wait = history(result.mlflow_run_id, "images_per_s"), history(result.mlflow_run_id, "data_wait_frac")
    trainer = statistics.median(ips[3:] or ips)
    after = model_only()

    # 3. fine-tuning the encoder just registered, on the same machinery
    ft_line = ""
    if not args.no_finetune and result.model_version is not None:
        from mae_service.finetune.driver import finetune

        ft_cfg = build_config(
            {},
            [
                *overrides,
                f"data.val_uri={tmp / 'data' / 'val'}",
                f"finetune.model_uri={result.model_version.alias_uri}",
                f"finetune.batch_size={args.batch}",
                "finetune.epochs=1",
                "finetune.warmup_epochs=0",
                "finetune.register=false",
                "train.run_name=bench-ft",
            ],
        )
        ft = finetune(ft_cfg)
        ft_ips, ft_wait = history(ft.mlflow_run_id, "images_per_s"), history(ft.mlflow_run_id, "data_wait_frac")
        ft_line = (
            f"fine-tune trainer:          {statistics.median(ft_ips[3:] or ft_ips):8.1f} img/s   "
            f"data-wait median {statistics.median(ft_wait[3:] or ft_wait):.1%} ({len(ft_ips)} steps)"
        )
    best = max(before, after)
    from mae_service.model.precision import amp_name, resolve_amp

    precision = amp_name(resolve_amp(cfg.train.amp, torch.device("cpu")))
    print(
        f"config: {args.model} patch {args.patch} img {args.image_size} batch {args.batch}, {threads} thread(s), "
        f"{precision} (train.amp={args.amp}), {len(ips)} trainer steps"
    )
    print(f"model-only step:            {best:8.1f} img/s   (before {before:.1f}, after {after:.1f}: the better one)")
    print(
        f"trainer (Ray Data feeding): {trainer:8.1f} img/s   data-wait median {statistics.median(wait[3:] or wait):.1%}"
    )
    print(f"ratio trainer / model-only: {trainer / best:8.2f}   (target ≥ 0.9)")
    if ft_line:
        print(ft_line)


if __name__ == "__main__":
    main()
