"""The per-worker fine-tuning function run by Ray Train's ``TorchTrainer`` (one process per DDP rank).

The same shape as pretraining's :mod:`mae_service.train.loop`: classifier and optimiser → restore → data shard →
optimiser steps, each logged by rank 0; at the end of every epoch rank 0 scores the held-out set (top-1/top-5),
and every ``finetune.checkpoint_every_epochs`` epochs (and at the last step) rank 0 writes a checkpoint that every
rank reports. Mixup/CutMix and drop path draw from RNGs seeded by ``(seed, rank, step)``, so a resumed run takes
the same steps. The checkpoints are pretraining's (:mod:`mae_service.train.checkpoint`), holding the classifier.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mae_service.config import Config, config_from_dict
from mae_service.model import normalize
from mae_service.model.classifier import create_classifier, layer_decay_groups, load_encoder_weights, set_group_lrs
from mae_service.model.precision import amp_name, autocast, describe_device, resolve_amp
from mae_service.train.checkpoint import (
    CheckpointMeta,
    load_model_weights,
    load_training_state,
    read_meta,
    save_checkpoint,
    step_dir_name,
)
from mae_service.train.loop import rank_batches, resume_checkpoint
from mae_service.train.run_logger import RunLogger
from mae_service.train.schedule import lr_at
from mae_service.train.spool import spool_from_dict
from mae_service.train.step import StepPlan

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    cfg: Config
    plan: StepPlan
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    mixup: Any
    criterion: Any
    ddp_model: torch.nn.Module | None = None
    step: int = 0
    bad: int = 0
    last_loss: float = float("nan")
    epoch_losses: list[float] | None = None


def recipe(cfg: Config) -> dict[str, float]:
    """The regularisation a protocol trains with: the paper's fine-tuning recipe, or for ``blocks=0`` its linear
    probe's (no mixup, cutmix, label smoothing or weight decay)."""
    ft = cfg.finetune
    if ft.blocks == 0:
        return {"mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0, "weight_decay": 0.0}
    return {"mixup": ft.mixup, "cutmix": ft.cutmix, "smoothing": ft.smoothing, "weight_decay": ft.weight_decay}


def base_lr(cfg: Config) -> float:
    return cfg.finetune.blr * cfg.finetune.batch_size / 256


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train.torch

    w = _build(config)
    _restore(w, config)
    w.ddp_model = ray.train.torch.prepare_model(w.model, move_to_device=False)
    batches = _batches(w, config["start_rows"])
    run = (
        RunLogger(
            config["tracking_uri"],
            config["mlflow_run_id"],
            system_metrics=False,
            spool=spool_from_dict(config.get("spool")),
            recorded_through=int(config.get("recorded_through", -1)),
        )
        if w.rank == 0
        else None
    )
    if run is not None:
        run.tag("mae.amp_worker", f"{amp_name(w.amp)} on {describe_device(w.device)}")
        if w.step == 0:
            run.metrics({f"val_{k}": v for k, v in _evaluate(w, config).items() if v is not None}, 0)
    w.epoch_losses = []
    while w.step < w.plan.total_steps:
        _train_step(w, batches, run)
        _end_of_epoch(w, run, config)
    if run is not None:
        run.close()


def _build(config: dict[str, Any]) -> Worker:
    import ray
    import ray.train
    import ray.train.torch
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    model = create_classifier(config["arch"], seed=cfg.train.seed)
    if config.get("encoder_ref") is not None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in ray.get(config["encoder_ref"]).items()}
        load_encoder_weights(model, state)
    model = model.to(device)
    r = recipe(cfg)
    groups = layer_decay_groups(model, weight_decay=r["weight_decay"], layer_decay=cfg.finetune.layer_decay)
    b = cfg.finetune.betas
    optimizer = torch.optim.AdamW(groups, lr=base_lr(cfg), betas=(b[0], b[1]), fused=device.type == "cuda" or None)
    amp = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    num_classes = config["arch"]["num_classes"]
    mixup = None
    if r["mixup"] > 0 or r["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], label_smoothing=r["smoothing"], num_classes=num_classes
        )
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=r["smoothing"])
    plan = StepPlan(**config["plan"])
    rank = ctx.get_world_rank()
    logger.info("rank %d: fine-tuning in %s on %s", rank, amp_name(amp), describe_device(device))
    return Worker(cfg, plan, rank, ctx.get_world_size(), device, model, optimizer, scaler, amp, mixup, criterion)


def _restore(w: Worker, config: dict[str, Any]) -> None:
    ckpt = resume_checkpoint(config)
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        meta = read_meta(d)
        load_model_weights(d, w.model)
        load_training_state(d, optimizer=w.optimizer, scaler=w.scaler)
    w.step, w.bad = meta.step, int((meta.config.get("_progress") or {}).get("bad_objects", 0))
    if w.rank == 0:
        logger.info("restored step %d from %s", w.step, ckpt.path)


def _batches(w: Worker, start_rows: int):
    return rank_batches(w.rank, w.step, w.plan, start_rows)


def _seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % (2**32)


def _train_step(w: Worker, batches, run: RunLogger | None) -> None:
    ft, plan = w.cfg.finetune, w.plan
    lr = lr_at(
        w.step,
        base_lr=base_lr(w.cfg),
        warmup_steps=plan.warmup_steps(ft.warmup_epochs),
        total_steps=plan.schedule_steps,
        min_lr=ft.min_lr,
    )
    set_group_lrs(w.optimizer, lr)
    t0 = time.perf_counter()
    batch = next(batches)
    waited = time.perf_counter() - t0
    seed = _seed(w.cfg.train.seed, w.rank, w.step)
    torch.manual_seed(seed)  # drop path
    np.random.seed(seed)  # timm's Mixup draws lambda and the cut box from numpy's global RNG
    x = normalize(batch["image"].to(w.device, non_blocking=True))
    y = batch["label"].to(w.device)
    if w.mixup is not None:
        x, y = w.mixup(x, y)
    assert w.ddp_model is not None
    w.model.train()
    with autocast(w.amp, w.device):
        logits = w.ddp_model(x)
    loss = w.criterion(logits.float(), y)
    w.scaler.scale(loss).backward()
    local = torch.tensor(
        [float(torch.nan_to_num(loss.detach(), nan=0.0)), float(not torch.isfinite(loss)), float(batch["n_bad"].sum())],
        dtype=torch.float64,
    )
    if dist.is_available() and dist.is_initialized() and w.world > 1:
        dist.all_reduce(local)
    total_loss, bad_flag, bad_rows = local.tolist()
    if bad_flag > 0:
        w.optimizer.zero_grad(set_to_none=True)
        logger.warning("rank %d step %d: non-finite loss, step skipped", w.rank, w.step)
    else:
        w.scaler.step(w.optimizer)
        w.scaler.update()
        w.optimizer.zero_grad(set_to_none=True)
        w.last_loss = total_loss / w.world
        assert w.epoch_losses is not None
        w.epoch_losses.append(w.last_loss)
    w.step += 1
    w.bad += int(bad_rows)
    if run is not None:
        dt = time.perf_counter() - t0  # rank 0's step, data wait included (as pretraining measures it)
        run.metrics(
            {
                "loss": w.last_loss,
                "lr": lr,
                "bad_objects": float(w.bad),
                "images_per_s": len(batch["image"]) * w.world / dt if dt > 0 else 0.0,
                "data_wait_frac": min(1.0, waited / dt) if dt > 0 else 0.0,
            },
            w.step,
        )


@torch.no_grad()
def _evaluate(w: Worker, config: dict[str, Any]) -> dict[str, float | None]:
    """Top-1 and top-5 (None with fewer than 5 classes) of the classifier on the held-out set (rank 0)."""
    from mae_service.data import eval_dataset
    from mae_service.model.classifier import topk_correct

    model = w.model
    model.eval()
    n = c1 = c5 = 0
    ds = eval_dataset(config["val_source"], image_size=config["arch"]["image_size"])
    for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
        keep = b["label"] >= 0
        if not keep.any():
            continue
        x = normalize(torch.from_numpy(np.ascontiguousarray(b["image"][keep])).to(w.device))
        with autocast(w.amp, w.device):
            logits = model(x).float()
        got = topk_correct(logits, torch.from_numpy(b["label"][keep]).to(w.device))
        n, c1, c5 = n + len(x), c1 + got[0], c5 + got[1]
    model.train()
    five = config["arch"]["num_classes"] >= 5
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1) if five else None}


def _end_of_epoch(w: Worker, run: RunLogger | None, config: dict[str, Any]) -> None:
    """At the end of each epoch: held-out top-1/top-5 and the epoch's mean train loss (rank 0); at checkpoint
    epochs and the last step, a checkpoint written by rank 0 and reported by every rank."""
    import ray.train
    from ray.train import Checkpoint

    plan, last = w.plan, w.plan.total_steps
    if not (w.step % plan.steps_per_epoch == 0 or w.step == last):
        return
    epoch = math.ceil(w.step / plan.steps_per_epoch)
    report: dict[str, Any] = {"step": w.step, "epoch": epoch, "loss": w.last_loss, "bad_objects": w.bad}
    if w.rank == 0:
        val = _evaluate(w, config)
        report.update({f"val_{k}": v for k, v in val.items()})
        losses = w.epoch_losses or [w.last_loss]
        epoch_metrics = {"train_loss": sum(losses) / len(losses), "epoch": float(epoch)}
        epoch_metrics.update({f"val_{k}": v for k, v in val.items() if v is not None})
        if run is not None:
            run.metrics(epoch_metrics, w.step)
            run.flush()
        logger.info(
            "epoch %d step %d/%d train loss %.4f val top-1 %.4f", epoch, w.step, last, epoch_metrics["train_loss"],
            val["top1"],
        )  # fmt: skip
    w.epoch_losses = []
    if not (epoch % w.cfg.finetune.checkpoint_every_epochs == 0 or w.step == last):
        ray.train.report(report)
        return
    progress = {"bad_objects": w.bad, "step": w.step, **{k: v for k, v in report.items() if k.startswith("val_")}}
    saved = {**w.cfg.to_dict(), "_progress": progress}
    meta = CheckpointMeta(
        step=w.step,
        rows_per_rank=w.step * plan.rows_per_step,
        config=saved,
        model_args=dict(config["arch"]),
        mlflow_run_id=config.get("mlflow_run_id"),
        loss=w.last_loss,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if w.rank == 0:
            save_checkpoint(tmp, model=w.model, optimizer=w.optimizer, scaler=w.scaler, meta=meta)
        ray.train.report(
            report,
            checkpoint=Checkpoint.from_directory(tmp) if w.rank == 0 else None,
            checkpoint_dir_name=step_dir_name(w.step),
        )
    if w.rank == 0:
        logger.debug("checkpoint at step %d in %.1f s", w.step, time.perf_counter() - t0)
