"""The per-worker training function run by Ray Train's ``TorchTrainer`` (one process per DDP rank).

Reads like a table of contents: model and optimiser → restore → data shard → loop of optimiser steps, each
followed by logging and, every ``train.checkpoint_every_steps``, a checkpoint and a report. Every rank calls
``ray.train.report`` the same number of times (at checkpoint/eval steps) and consumes the same number of rows
(the data module gives each rank an equal, deterministic stream), so DDP never waits on a rank that has stopped.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mae_service.config import Config, config_from_dict
from mae_service.model.precision import amp_name, describe_device, resolve_amp
from mae_service.train.checkpoint import (
    CheckpointMeta,
    load_model_weights,
    load_training_state,
    read_meta,
    save_checkpoint,
    step_dir_name,
)
from mae_service.train.progress import post
from mae_service.train.run_logger import RunLogger
from mae_service.train.schedule import lr_at, make_optimizer, set_lr
from mae_service.train.spool import spool_from_dict
from mae_service.train.step import NonFiniteLossError, StepPlan, build_model, compile_model, optimizer_step

if TYPE_CHECKING:
    from mae_service.model.mae import MaskedAutoencoder

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """What one rank trains: the bare model, its DDP (and ``torch.compile``) wrapper, the optimiser, the AMP
    scaler and the autocast dtype (None: fp32) ``train.amp`` resolved to on this rank's device."""

    cfg: Config
    plan: StepPlan
    rank: int
    world: int
    device: torch.device
    model: MaskedAutoencoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None = None
    ddp_model: torch.nn.Module | None = None
    step: int = 0
    board: Any = None  # rank 0: the driver's progress bar (mae_service.train.progress), when it draws one


@dataclass
class Progress:
    """Counters across steps (rank-local inputs; the reported numbers are all-reduced by ``optimizer_step``)."""

    consecutive_bad: int = 0
    total_bad: int = 0
    last_loss: float = float("nan")
    t_last: float = field(default_factory=time.perf_counter)
    picture_batch: torch.Tensor | None = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train.torch

    w = _build(config)
    w.board = config.get("progress") if w.rank == 0 else None
    _restore(w, config)
    w.ddp_model = ray.train.torch.prepare_model(w.model, move_to_device=False)
    if w.cfg.train.compile:
        w.ddp_model = compile_model(w.ddp_model)  # checkpoints keep saving w.model: the same key names
    batches = _batches(w, config["start_rows"])
    run = (
        RunLogger(
            config["tracking_uri"],
            config["mlflow_run_id"],
            system_metrics=w.cfg.mlflow.log_system_metrics,
            spool=spool_from_dict(config.get("spool")),
            recorded_through=int(config.get("recorded_through", -1)),
        )
        if w.rank == 0 and config.get("mlflow_run_id")
        else None
    )
    if run is not None:
        run.tag("mae.amp_worker", f"{amp_name(w.amp)} on {describe_device(w.device)}")
    progress = Progress()
    while w.step < w.plan.total_steps:
        metrics = _train_step(w, batches, progress)
        _log(w, run, metrics, progress)
        _checkpoint_and_report(w, run, config, progress)
    if run is not None:
        run.close()


def _build(config: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.train.weight_decay, betas=(cfg.train.betas[0], cfg.train.betas[1])
    )
    amp = resolve_amp(cfg.train.amp, device)  # this rank's device decides (the driver checked its own CPU)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    rank = ctx.get_world_rank()
    logger.info(
        "rank %d: autocast %s on %s (train.amp=%s)%s",
        rank,
        amp_name(amp),
        describe_device(device),
        cfg.train.amp,
        ", torch.compile" if cfg.train.compile else "",
    )
    return Worker(cfg, StepPlan(**config["plan"]), rank, ctx.get_world_size(), device, model, optimizer, scaler, amp)


def _restore(w: Worker, config: dict[str, Any]) -> None:
    ckpt = resume_checkpoint(config)
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        meta = read_meta(d)
        load_model_weights(d, w.model)
        load_training_state(d, optimizer=w.optimizer, scaler=w.scaler)
    w.step = meta.step
    if w.rank == 0:
        logger.info("restored step %d from %s", w.step, ckpt.path)


def resume_checkpoint(config: dict[str, Any]) -> Any:
    """The checkpoint a rank starts from: the newer of Ray Train's own (after a worker failure) and the resubmitted
    run's latest one (``config["resume_from"]``), else None.

    Ray Train's own can be the older one: a resubmit after the driver was killed restores the run state Ray Train
    persisted, whose latest checkpoint may predate one the killed driver wrote completely but had not registered."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = ray.train.get_checkpoint()
    if not config.get("resume_from"):
        return ckpt
    latest = Checkpoint(config["resume_from"], filesystem=config.get("resume_filesystem"))
    if ckpt is None or _step_of(ckpt.path) < _step_of(latest.path):
        return latest
    return ckpt


def _step_of(path: str) -> int:
    """The step of a checkpoint folder named :func:`step_dir_name` (-1 for another name)."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("step_")
    return int(digits) if name.startswith("step_") and digits.isdigit() else -1


def _batches(w: Worker, start_rows: int):
    if w.cfg.data.decode_device == "cpu":
        return rank_batches(w.rank, w.step, w.plan, start_rows)
    from mae_service.train.device_decode import decoded_batches

    def decode(batches):
        return decoded_batches(batches, seed=w.cfg.train.seed, size=w.cfg.data.image_size, device=w.device)

    return rank_batches(w.rank, w.step, w.plan, start_rows, decode=decode)


def rank_batches(rank: int, step: int, plan: StepPlan, start_rows: int, decode=None):
    """Rank ``rank``'s stream of micro-batches (dataset ``train_<rank>``), positioned at optimiser step ``step``.

    ``decode``: a stream of encoded rows (``data.decode_device=cuda``), decoded on this worker by
    ``decode(numpy batches)``; skipped rows are not decoded."""
    import ray.data
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop logs its own progress
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    if decode is None:
        batches = iter(shard.iter_torch_batches(batch_size=plan.micro_batch, prefetch_batches=2, drop_last=True))
    else:
        batches = iter(shard.iter_batches(batch_size=plan.micro_batch, prefetch_batches=2, drop_last=True))
    skip_rows = step * plan.rows_per_step - start_rows
    if skip_rows < 0:
        raise RuntimeError(
            f"checkpoint at step {step} is older than the data stream start ({start_rows} rows); "
            "resubmit the run to rebuild its data stream"
        )
    for _ in range(skip_rows // plan.micro_batch):  # only after a worker failure: the stream restarts at job start
        next(batches)
    return batches if decode is None else iter(decode(batches))


def _train_step(w: Worker, batches, progress: Progress) -> dict[str, float]:
    """One optimiser step; returns its metrics (``loss`` missing when the step was skipped)."""
    t = w.cfg.train
    lr = lr_at(
        w.step,
        base_lr=w.cfg.lr,
        warmup_steps=w.plan.warmup_steps(t.warmup_epochs),
        total_steps=w.plan.schedule_steps,
        min_lr=t.min_lr,
    )
    set_lr(w.optimizer, lr)
    t0 = time.perf_counter()
    micro_batches = [next(batches) for _ in range(w.plan.accum)]
    wait = time.perf_counter() - t0
    bad_rows = sum(int(b["n_bad"].sum()) for b in micro_batches if "n_bad" in b)
    if progress.picture_batch is None and w.rank == 0:
        progress.picture_batch = micro_batches[0]["image"][:4].clone()
    assert w.ddp_model is not None
    res = optimizer_step(
        w.ddp_model,
        w.model,
        w.optimizer,
        w.scaler,
        [b["image"] for b in micro_batches],
        cfg=w.cfg,
        device=w.device,
        rank=w.rank,
        step=w.step,
        sums=(float(bad_rows), wait),
    )
    if res.skipped:
        progress.consecutive_bad += 1
        logger.warning(
            "rank %d step %d: non-finite loss, step skipped (%d in a row)", w.rank, w.step, progress.consecutive_bad
        )
        if progress.consecutive_bad > t.max_nonfinite_skips:
            raise NonFiniteLossError(
                f"{progress.consecutive_bad} consecutive non-finite losses at step {w.step}; "
                "rolling back to the last checkpoint"
            )
    else:
        progress.consecutive_bad = 0
    w.step += 1
    now = time.perf_counter()
    dt, progress.t_last = now - progress.t_last, now
    progress.last_loss = res.loss
    progress.total_bad += int(res.sums[0])
    metrics = {
        "loss": res.loss,
        "lr": lr,
        "epoch": w.step / w.plan.steps_per_epoch,
        "images_per_s": w.plan.rows_per_step * w.world / dt if dt > 0 else 0.0,
        "data_wait_frac": min(1.0, res.sums[1] / w.world / dt) if dt > 0 else 0.0,
        "bad_objects": float(progress.total_bad),
        "skipped_step": float(res.skipped),
    }
    if res.skipped:
        del metrics["loss"]
    return metrics


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _log(w: Worker, run: RunLogger | None, metrics: dict[str, float], progress: Progress) -> None:
    t, last = w.cfg.train, w.plan.total_steps
    post(w.board, w.step, progress.last_loss, metrics["images_per_s"])
    if run is not None and _due(w.step, t.log_every_steps, last):
        run.metrics(metrics, w.step)
    if run is not None and progress.picture_batch is not None and _due(w.step, t.picture_every_steps, last):
        run.picture(w.model, progress.picture_batch, w.step, seed=t.seed, dtype=w.amp)
    if w.rank == 0 and _due(w.step, max(1, t.log_every_steps * 10), last):
        logger.info(
            "step %d/%d loss %.4f lr %.3g %.1f img/s data-wait %.0f%%",
            w.step,
            last,
            progress.last_loss,
            metrics["lr"],
            metrics["images_per_s"],
            100 * metrics["data_wait_frac"],
        )


def _checkpoint_and_report(w: Worker, run: RunLogger | None, config: dict[str, Any], progress: Progress) -> None:
    """At checkpoint and evaluation steps: k-NN on rank 0 (the others wait at ``report``, a barrier), then a
    checkpoint written by rank 0 and reported by every rank."""
    import ray.train
    from ray.train import Checkpoint

    t, last = w.cfg.train, w.plan.total_steps
    evaluate = bool(config.get("knn")) and (
        (t.eval_every_steps > 0 and w.step % t.eval_every_steps == 0) or w.step == last
    )
    if not (_due(w.step, t.checkpoint_every_steps, last) or evaluate):
        return
    report: dict[str, Any] = {"step": w.step, "loss": progress.last_loss, "bad_objects": progress.total_bad}
    if evaluate and w.rank == 0:
        from mae_service.evaluation.knn import knn_metrics

        knn = knn_metrics(w.model, config["knn"], dtype=w.amp)
        report.update(knn)
        if run is not None and knn:
            run.metrics(knn, w.step)
    if run is not None:
        run.flush()  # the metrics up to this checkpoint are in MLflow (or in the run's spool) before it exists
    meta = CheckpointMeta(
        step=w.step,
        rows_per_rank=w.step * w.plan.rows_per_step,
        config=w.cfg.to_dict(),
        model_args=dict(w.model.model_args),
        mlflow_run_id=config.get("mlflow_run_id"),
        loss=progress.last_loss,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if w.rank == 0:
            save_checkpoint(
                tmp,
                model=w.model,
                optimizer=w.optimizer,
                scaler=w.scaler,
                meta=meta,
                config_yaml=config.get("config_yaml"),
            )
        ray.train.report(
            report,
            checkpoint=Checkpoint.from_directory(tmp) if w.rank == 0 else None,
            checkpoint_dir_name=step_dir_name(w.step),
        )
