"""The per-worker training function run by Ray Train's ``TorchTrainer`` (one process per DDP rank).

Reads like a table of contents: restore → data shard → model/DDP → loop of optimiser steps → report.
Every rank calls ``ray.train.report`` the same number of times (at checkpoint/eval steps), every rank consumes the
same number of rows (the data module gives each rank an equal, deterministic stream), and every rank takes the
same skip/step decision for a non-finite loss, so DDP never waits on a rank that has stopped.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from mae_service.config import Config, config_from_dict
from mae_service.model import create_model, normalize
from mae_service.train.checkpoint import (
    CheckpointMeta,
    load_model_weights,
    load_training_state,
    save_checkpoint,
    step_dir_name,
)
from mae_service.train.schedule import lr_at, make_optimizer, set_lr

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run rolls back to its last checkpoint (a Ray Train retry)."""


def model_kwargs(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    kw: dict[str, Any] = dict(img_size=cfg.data.image_size, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                              decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                              decoder_num_heads=m.decoder_num_heads)
    if m.patch_size is not None:
        kw["patch_size"] = m.patch_size
    return kw


def build_model(cfg: Config) -> torch.nn.Module:
    return create_model(cfg.model.name, **model_kwargs(cfg))


def mask_noise(n: int, num_patches: int, *, seed: int, rank: int, step: int, micro: int) -> torch.Tensor:
    """Masking noise as a pure function of (seed, rank, step, micro-batch): a resumed run draws the same masks."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_009 + micro)
    return torch.rand(n, num_patches, generator=g)


def autocast_context(cfg: Config, device: torch.device):
    amp = cfg.train.amp
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class StepAccounting:
    """How rows of each rank's stream map onto optimiser steps (pure numbers)."""

    def __init__(self, *, micro_batch: int, accum: int, steps_per_epoch: int, epochs: int, max_steps: int | None):
        self.micro_batch, self.accum = micro_batch, accum
        self.rows_per_step = micro_batch * accum
        self.schedule_steps = steps_per_epoch * epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = min(self.schedule_steps, max_steps) if max_steps else self.schedule_steps


class StepResult(NamedTuple):
    loss: float  # mean over ranks of the step's loss (NaN when the step was skipped)
    skipped: bool  # some rank's loss was non-finite: every rank skipped the update
    sums: list[float]  # the caller's ``sums``, added over ranks


def optimizer_step(ddp_model: torch.nn.Module, core: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, micro_batches: list[torch.Tensor], *, cfg: Config,
                   device: torch.device, rank: int, step: int, sums: Sequence[float] = ()) -> StepResult:
    """One optimiser step over ``micro_batches`` (uint8 images) with gradient accumulation.

    One collective and one host synchronisation per step, whatever the accumulation: the losses stay on the
    device until the step's single all-reduce, which carries the loss, a non-finite flag and the caller's
    ``sums`` (bad rows, data-wait seconds). A non-finite loss on any rank makes every rank skip the update
    together: every rank still runs its backward passes (so DDP's gradient all-reduce is entered by all), and the
    decision is taken on the all-reduced flag, which is the same number on every rank.
    """
    accum = len(micro_batches)
    ddp = ddp_model is not core
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for micro, images in enumerate(micro_batches):
        imgs = normalize(images.to(device, non_blocking=True))
        noise = mask_noise(imgs.shape[0], core.num_patches, seed=cfg.train.seed, rank=rank, step=step,
                           micro=micro).to(device)
        sync = (not ddp) or micro == accum - 1
        with (nullcontext() if sync else ddp_model.no_sync()):
            with autocast_context(cfg, device):
                loss, _, _ = ddp_model(imgs, noise=noise)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float() / accum
    bad = (~torch.isfinite(loss_sum)).to(torch.float64)
    local = torch.cat([torch.stack([torch.nan_to_num(loss_sum.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0),
                                    bad]),
                       torch.tensor(list(sums), dtype=torch.float64).to(device)])
    totals = _all_reduce(local).tolist()  # the step's one host sync
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if totals[1] > 0:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), True, totals[2:])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals[0] / world, False, totals[2:])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import mlflow
    import ray.data
    import ray.train
    import ray.train.torch
    from mlflow.entities import Metric
    from ray.train import Checkpoint

    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    acct = StepAccounting(micro_batch=cfg.micro_batch, accum=cfg.accum_steps, steps_per_epoch=config["steps_per_epoch"],
                          epochs=t.epochs, max_steps=t.max_steps)
    warmup_steps = int(round(t.warmup_epochs * acct.steps_per_epoch))
    base_lr = cfg.lr

    # ---- model, optimiser, restore ------------------------------------------------------------------------------
    torch.manual_seed(t.seed)
    model = build_model(cfg)
    optimizer_model = model
    model.to(device)
    optimizer = make_optimizer(optimizer_model, lr=base_lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.amp == "fp16")

    start_step, restored_from = 0, None
    ckpt = ray.train.get_checkpoint()  # Ray Train's own: after a worker failure, or a resubmitted run name
    if ckpt is None and config.get("resume_from"):
        ckpt = Checkpoint(config["resume_from"], filesystem=config.get("resume_filesystem"))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            from mae_service.train.checkpoint import read_meta

            meta = read_meta(d)
            load_model_weights(d, model)
            load_training_state(d, optimizer=optimizer, scaler=scaler)
        start_step, restored_from = meta.step, ckpt.path
        if rank == 0:
            logger.info("restored step %d from %s", start_step, restored_from)

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    core = model  # the unwrapped MaskedAutoencoder (pictures, checkpoints)

    # ---- data -----------------------------------------------------------------------------------------------------
    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop logs its own progress
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = iter(shard.iter_torch_batches(batch_size=acct.micro_batch, prefetch_batches=2, drop_last=True))
    skip_rows = start_step * acct.rows_per_step - config["start_rows"]
    if skip_rows < 0:
        raise RuntimeError(f"checkpoint at step {start_step} is older than the data stream start "
                           f"({config['start_rows']} rows); resubmit the run to rebuild its data stream")
    for _ in range(skip_rows // acct.micro_batch):  # only after a worker failure: the stream restarts at job start
        next(batches)

    # ---- tracking (rank 0 only) -------------------------------------------------------------------------------------
    run_id = config.get("mlflow_run_id")
    client = None
    if rank == 0 and run_id:
        mlflow.set_tracking_uri(config["tracking_uri"])
        client = mlflow.MlflowClient()
        if cfg.mlflow.log_system_metrics:
            try:
                mlflow.start_run(run_id=run_id, log_system_metrics=True)
            except Exception as e:  # noqa: BLE001 - system metrics are a nicety; never fail a run for them
                logger.warning("system metrics disabled: %s", e)

    picture_batch: torch.Tensor | None = None
    consecutive_bad = 0
    total_bad = 0
    last_loss = float("nan")
    step = start_step
    t_last = time.perf_counter()
    wait_acc = 0.0
    pending_logs: list[Any] = []  # MLflow RunOperations of queued metric batches

    def flush_logs() -> None:
        for op in pending_logs:
            try:
                op.wait()
            except Exception as e:  # noqa: BLE001 - a lost metric batch must not kill training
                logger.warning("metrics not logged to MLflow: %s", e)
        pending_logs.clear()

    while step < acct.total_steps:
        lr = lr_at(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=acct.schedule_steps, min_lr=t.min_lr)
        set_lr(optimizer, lr)
        micro_batches = []
        t0 = time.perf_counter()
        for _ in range(acct.accum):
            micro_batches.append(next(batches))
        wait_acc += time.perf_counter() - t0
        bad_rows = sum(int(b["n_bad"].sum()) for b in micro_batches if "n_bad" in b)
        if picture_batch is None and rank == 0:
            picture_batch = micro_batches[0]["image"][:4].clone()
        res = optimizer_step(ddp_model, core, optimizer, scaler, [b["image"] for b in micro_batches], cfg=cfg,
                             device=device, rank=rank, step=step, sums=(float(bad_rows), wait_acc))
        skipped = res.skipped
        if skipped:
            consecutive_bad += 1
            logger.warning("rank %d step %d: non-finite loss, step skipped (%d in a row)", rank, step, consecutive_bad)
            if consecutive_bad > t.max_nonfinite_skips:
                raise NonFiniteLossError(f"{consecutive_bad} consecutive non-finite losses at step {step}; "
                                         "rolling back to the last checkpoint")
        else:
            consecutive_bad = 0
        step += 1

        now = time.perf_counter()
        dt = now - t_last
        t_last, wait_acc = now, 0.0
        last_loss = res.loss
        total_bad += int(res.sums[0])
        metrics = {
            "loss": last_loss, "lr": lr, "epoch": step / acct.steps_per_epoch,
            "images_per_s": acct.rows_per_step * world / dt if dt > 0 else 0.0,
            "data_wait_frac": min(1.0, res.sums[1] / world / dt) if dt > 0 else 0.0,
            "bad_objects": float(total_bad), "skipped_step": float(skipped),
        }
        if skipped:
            del metrics["loss"]
        if client is not None and (step % t.log_every_steps == 0 or step == acct.total_steps):
            ts = int(time.time() * 1000)  # queued: MLflow's writer thread sends it while the next step runs
            pending_logs.append(client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step)
                                                                  for k, v in metrics.items()], synchronous=False))
        if client is not None and picture_batch is not None and (
                step % t.picture_every_steps == 0 or step == acct.total_steps):
            from mae_service.train.pictures import reconstruction_grid

            try:
                grid = reconstruction_grid(core, picture_batch, seed=t.seed)
                client.log_image(run_id, grid, artifact_file=f"reconstructions/step_{step:08d}.png")
            except Exception as e:  # noqa: BLE001 - a failed picture upload must not kill training
                logger.warning("reconstruction picture at step %d not logged: %s", step, e)
        if rank == 0 and (step % max(1, t.log_every_steps * 10) == 0 or step == acct.total_steps):
            logger.info("step %d/%d loss %.4f lr %.3g %.1f img/s data-wait %.0f%%", step, acct.total_steps, last_loss,
                        lr, metrics["images_per_s"], 100 * metrics["data_wait_frac"])

        evaluate = bool(config.get("knn")) and (
            (t.eval_every_steps > 0 and step % t.eval_every_steps == 0) or step == acct.total_steps)
        if step % t.checkpoint_every_steps == 0 or step == acct.total_steps or evaluate:
            report: dict[str, Any] = {"step": step, "loss": last_loss, "bad_objects": total_bad}
            if evaluate and rank == 0:  # the other ranks wait at report(), a barrier
                from mae_service.train.knn import knn_metrics

                report.update(knn_metrics(core, config["knn"]))
                if client is not None:
                    client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), step)
                                                      for k, v in report.items() if k.startswith("knn")])
            flush_logs()  # the metrics up to this checkpoint are in MLflow before it exists
            meta = CheckpointMeta(step=step, rows_per_rank=step * acct.rows_per_step, config=cfg.to_dict(),
                                  model_args=dict(core.model_args), mlflow_run_id=run_id, loss=last_loss)
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(tmp, model=core, optimizer=optimizer, scaler=scaler, meta=meta)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None,
                                 checkpoint_dir_name=step_dir_name(step))

    flush_logs()
    if rank == 0 and client is not None and cfg.mlflow.log_system_metrics:
        try:
            mlflow.end_run()
        except Exception:  # noqa: BLE001
            pass
