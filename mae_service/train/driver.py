"""The driver of a pretraining run: preflight → MLflow run → TorchTrainer.fit → register.

Runs where the user's command runs (``mae-service pretrain``, or ``jobs/pretrain.py`` as a Ray job's driver).
Everything that can be checked without cluster resources is checked first, and all problems are raised at once.
A run is identified by ``train.run_name``: resubmitting the same name continues its checkpoints and its MLflow run.

Public API (the sweep uses only these): :func:`preflight`, :func:`plan_steps`, :func:`pretrain`,
:func:`register_latest`, :class:`PretrainResult`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from mae_service.config import Config, ConfigError
from mae_service.runtime import ExitError, output_is_quiet
from mae_service.tracking.runs import (
    RUN_NAME_TAG,
    TrackingUnavailableError,
    clean_tags,
    connect,
    ensure_experiment,
    redact,
    resolve_tracking_uri,
    sanitize_uri,
    tracking_problem,
)
from mae_service.train.checkpoint import (
    CheckpointMeta,
    checkpoint_uri,
    latest_checkpoint,
    storage_failure,
    store_unreachable,
)
from mae_service.train.preflight import Inputs, plan_steps, preflight
from mae_service.train.progress import ProgressBar
from mae_service.train.spool import Spool
from mae_service.train.trainer import ray_trainer, start_ray

__all__ = [
    "PretrainResult",
    "StorageUnavailableError",
    "plan_steps",
    "preflight",
    "pretrain",
    "register_from_checkpoint",
    "register_latest",
]

logger = logging.getLogger(__name__)


class StorageUnavailableError(ExitError):
    """Training stopped because its storage refused a write (full, read-only) or an S3 store stopped answering:
    one line naming the path or URI (exit 2); the checkpoints written before are intact, a resubmit continues."""


@dataclass
class PretrainResult:
    run_name: str
    mlflow_run_id: str | None
    tracking_uri: str
    checkpoint_uri: str | None
    step: int
    loss: float | None
    model_version: Any = None
    metrics: dict[str, Any] | None = None
    train_seconds: float | None = None  # wall time of trainer.fit() in this command


def open_mlflow_run(
    cfg: Config, run_name: str, run_id: str | None, tags: dict[str, str] | None = None, *, amp: str | None = None
) -> str:
    """Continue (``run_id``, or the run tagged with ``run_name``) or create the run's MLflow run. A new run gets the
    resolved config as params (with ``train.amp_resolved``: ``amp``, the driver's resolution of ``train.amp``,
    when it made one) and as the artifact ``config.yaml``."""
    from mae_service.tracking.runs import open_run

    client, uri = connect(cfg.mlflow.tracking_uri, must_exist=False)
    exp_id = ensure_experiment(client, cfg.mlflow.experiment, uri)
    params = {**cfg.flat(), **({"train.amp_resolved": amp} if amp else {})}
    run_id = open_run(
        client,
        exp_id,
        run_name=run_name,
        key_tags={RUN_NAME_TAG: run_name},
        params=params,
        tags={"mae.config_hash": cfg.digest(), **(tags or {})},
        run_id=run_id,
    )
    client.log_text(run_id, config_yaml(cfg), "config.yaml")
    return run_id


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, credentials scrubbed (stored beside checkpoints and in MLflow)."""
    return redact(cfg.to_yaml())


def _resume_point(cfg: Config, run_name: str) -> tuple[Any, Any, CheckpointMeta | None]:
    """``(checkpoint path, its filesystem, meta)`` of the run's latest checkpoint, or Nones; refuses a checkpoint
    made with settings that define another run."""
    found = latest_checkpoint(cfg.train.storage_path, run_name, cfg.data.s3_endpoint)
    if found is None:
        return None, None, None
    path, fs, meta = found
    changes = cfg.resume_conflicts(meta.config)
    if changes:
        raise ConfigError(
            [
                f"train.run_name={run_name!r} already has checkpoints made with other settings "
                f"(use another run name to start afresh): " + "; ".join(changes)
            ]
        )
    logger.info("run %s: continuing from step %d (%s)", run_name, meta.step, path)
    return path, fs, meta


def _trainer(
    cfg: Config, inputs: Inputs, loop_config: dict[str, Any], run_name: str, start_rows: int, callbacks: list | None
) -> Any:
    from mae_service.train.loop import train_loop_per_worker

    return ray_trainer(
        cfg,
        train_loop_per_worker,
        loop_config,
        run_name,
        inputs.train,
        image_size=cfg.data.image_size,
        micro_batch=cfg.micro_batch,
        epochs=cfg.train.epochs,
        start_rows=start_rows,
        callbacks=callbacks,
        decode_device=cfg.data.decode_device,
    )


def _loop_config(
    cfg: Config, inputs: Inputs, *, start_rows: int, resume: tuple[Any, Any], run_id: str, spool: Spool
) -> dict:
    knn = None
    if inputs.val is not None:
        knn = {
            "train_source": inputs.train,
            "val_source": inputs.val,
            "image_size": cfg.data.image_size,
            "k": cfg.train.knn_k,
            "max_train": 5000,
        }
    return {
        "cfg": cfg.to_dict(),
        "plan": inputs.plan.to_dict(),
        "start_rows": start_rows,
        "resume_from": resume[0],
        "resume_filesystem": resume[1],
        "mlflow_run_id": run_id,
        "tracking_uri": resolve_tracking_uri(cfg.mlflow.tracking_uri),
        "knn": knn,
        "config_yaml": config_yaml(cfg),
        "spool": spool.to_dict(),
    }


def pretrain(
    cfg: Config,
    *,
    callbacks: list | None = None,
    mlflow_tags: dict[str, str] | None = None,
    register: bool | None = None,
    show_progress: bool | None = None,
) -> PretrainResult:
    """Run (or continue) the pretraining run described by ``cfg``; returns where its results are.

    ``show_progress`` draws the driver's step bar (default: when output is quiet, i.e. without ``-v``).
    ``callbacks`` go to Ray Train's RunConfig (a sweep passes Tune's report callback); ``mlflow_tags`` are set on a
    new MLflow run (a sweep passes ``mlflow.parentRunId``); ``register`` overrides ``registry.register``.
    """
    inputs = preflight(cfg)
    t, plan = cfg.train, inputs.plan
    show_progress = output_is_quiet() if show_progress is None else show_progress
    run_name = t.run_name or time.strftime("mae-%Y%m%d-%H%M%S")
    resume_from, resume_fs, meta = _resume_point(cfg, run_name)
    start_step = meta.step if meta else 0
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    finished = meta is not None and start_step >= plan.total_steps
    if not finished:
        start_ray(cfg)  # before the MLflow run opens: a cluster that cannot run the job leaves no RUNNING record
    run_id = open_mlflow_run(cfg, run_name, meta.mlflow_run_id if meta else None, mlflow_tags, amp=inputs.amp)
    spool = Spool(t.storage_path, run_name, cfg.data.s3_endpoint)
    replay_spool(spool, tracking_uri)  # what an earlier submission could not record, into the same run
    recorded = recorded_through(tracking_uri, run_id) if meta is not None else -1
    if finished:
        assert meta is not None
        logger.info("run %s is already at step %d of %d: nothing to train", run_name, start_step, plan.total_steps)
        done = PretrainResult(
            run_name, run_id, tracking_uri, checkpoint_uri(t.storage_path, resume_from), start_step, meta.loss
        )
        return _finish_trained(cfg, done, resume_from, resume_fs, register)
    start_rows = start_step * plan.rows_per_step
    loop_config = _loop_config(
        cfg, inputs, start_rows=start_rows, resume=(resume_from, resume_fs), run_id=run_id, spool=spool
    )
    if recorded > start_step:
        logger.info(
            "run %s: steps %d–%d are already in MLflow (trained before the last checkpoint was lost to an "
            "interruption): they are re-trained but not recorded again",
            run_name,
            start_step + 1,
            recorded,
        )
    loop_config["recorded_through"] = recorded
    logger.info(
        "run %s: %d steps (%d per epoch), %d workers, global batch %d (%d × %d accumulation), lr %.3g, %s%s",
        run_name,
        plan.total_steps,
        plan.steps_per_epoch,
        t.num_workers,
        t.batch_size,
        cfg.micro_batch,
        cfg.accum_steps,
        cfg.lr,
        inputs.amp or f"train.amp={t.amp} (resolved on the workers)",
        ", torch.compile" if t.compile else "",
    )
    out = PretrainResult(run_name, run_id, tracking_uri, None, start_step, None)
    with ProgressBar(plan.total_steps, start_step) if show_progress else nullcontext() as board:
        loop_config["progress"] = board
        trainer = _trainer(cfg, inputs, loop_config, run_name, start_rows, callbacks)
        return _fit(cfg, trainer, out, register, spool)


def recorded_through(tracking_uri: str, run_id: str) -> int:
    """The last step of run ``run_id``'s ``loss`` history in MLflow (-1 when none).

    A resubmitted run restarts from its latest checkpoint; the steps an interrupted submission trained and
    recorded after that checkpoint are trained again, and rank 0 does not record them a second time (MLflow
    would keep both points of a step): a step in MLflow keeps its first value."""
    from mae_service.train.run_logger import bounded_http

    client = connect(tracking_uri, must_exist=False)[0]
    with bounded_http():
        history = client.get_metric_history(run_id, "loss")
    return max((int(m.step) for m in history), default=-1)


def replay_spool(spool: Spool, tracking_uri: str) -> int:
    """Replay ``spool`` (the MLflow records a run could not deliver) into the tracking store; see
    :func:`mae_service.train.run_logger.replay_spool`."""
    from mae_service.train.run_logger import replay_spool as replay

    return replay(spool, tracking_uri)


def _finish_trained(cfg: Config, out: PretrainResult, path: str, fs: Any, register: bool | None) -> PretrainResult:
    """A resubmitted run that has trained all its steps: register its final checkpoint (``registry.register``, under
    this job's ``registry.alias``), then close its MLflow run FINISHED (FAILED when registering fails)."""
    from ray.train import Checkpoint

    client = connect(out.tracking_uri, must_exist=False)[0]
    assert out.mlflow_run_id is not None
    status = "FAILED"
    try:
        if out.checkpoint_uri:
            client.set_tag(out.mlflow_run_id, "mae.checkpoint_uri", out.checkpoint_uri)
        if cfg.registry.register if register is None else register:
            out.model_version = register_from_checkpoint(cfg, Checkpoint(path, filesystem=fs), out)
        status = "FINISHED"
    finally:
        client.set_terminated(out.mlflow_run_id, status=status)
    return out


def _fit(cfg: Config, trainer: Any, out: PretrainResult, register: bool | None, spool: Spool) -> PretrainResult:
    """``trainer.fit()``, then the run's MLflow record and (``registry.register``) the encoder's registration.

    Training never depends on the tracking server: when it does not answer at the end, the checkpoint stays
    written, what could not be recorded goes to ``spool``, and :class:`TrackingUnavailableError` says to resubmit
    (which replays the spool, registers and closes the MLflow run)."""
    client = connect(out.tracking_uri, must_exist=False)[0]
    assert out.mlflow_run_id is not None
    t_fit = time.monotonic()
    try:
        result = trainer.fit()
        out.train_seconds = time.monotonic() - t_fit
        logger.info("training finished in %.0f s", out.train_seconds)
    except BaseException as e:
        _terminate_quietly(client, out, "FAILED")
        problem = storage_failure(e, cfg.train.storage_path) or store_unreachable(
            e, cfg.train.storage_path, cfg.data.train_uri
        )
        if problem:
            raise StorageUnavailableError(problem) from e
        raise
    ckpt = result.checkpoint
    out.metrics = dict(result.metrics or {})
    out.checkpoint_uri = checkpoint_uri(cfg.train.storage_path, ckpt.path if ckpt else None)
    out.step, out.loss = int(out.metrics.get("step", 0)), out.metrics.get("loss")
    from mae_service.train.run_logger import tag_record

    run_id = out.mlflow_run_id  # not None (asserted above), for the closure

    def record() -> None:
        client.set_tag(run_id, "mae.checkpoint_uri", out.checkpoint_uri or "")
        if (cfg.registry.register if register is None else register) and ckpt is not None:
            out.model_version = register_from_checkpoint(cfg, ckpt, out)

    if record_and_close(client, out.tracking_uri, run_id, spool, record):
        return out
    held = spool.read()
    spool.write([*held, tag_record(out.mlflow_run_id, "mae.checkpoint_uri", out.checkpoint_uri or "")])
    raise TrackingUnavailableError(
        f"training finished at step {out.step} (checkpoint {out.checkpoint_uri}) but the MLflow tracking server "
        f"{sanitize_uri(out.tracking_uri)} is unreachable; {len(held) + 1} records are kept in {spool.uri}: "
        "resubmit the same command to finish the MLflow record"
    )


def record_and_close(client: Any, tracking_uri: str, run_id: str, spool: Spool, record: Callable[[], None]) -> bool:
    """At the end of a trained run: replay ``spool`` (what rank 0 could not deliver), call ``record`` (tags,
    registration), then close run ``run_id`` FINISHED (even when ``record`` fails), all under bounded HTTP. False
    when the tracking server does not answer (before or during this): the caller keeps what is left for a resubmit
    and says so. Other errors, and an MLflow error while the server answers, are raised."""
    from mlflow.exceptions import MlflowException

    from mae_service.train.run_logger import bounded_http, is_transient

    if tracking_problem(tracking_uri, must_exist=False) is not None:
        return False
    try:
        with bounded_http():
            replay_spool(spool, tracking_uri)
            try:
                record()
            finally:
                client.set_terminated(run_id, status="FINISHED")
        return True
    except (MlflowException, OSError) as e:
        if tracking_problem(tracking_uri, must_exist=False) is None or (
            isinstance(e, MlflowException) and not is_transient(e)
        ):
            raise
        return False


def _terminate_quietly(client: Any, out: PretrainResult, status: str) -> None:
    """Close the MLflow run with ``status`` if the tracking store answers (a warning when it does not: the error
    being raised is what the user needs to see)."""
    from mae_service.train.run_logger import bounded_http

    assert out.mlflow_run_id is not None
    problem = tracking_problem(out.tracking_uri, must_exist=False)
    try:
        if problem is None:
            with bounded_http():
                client.set_terminated(out.mlflow_run_id, status=status)
            return
    except Exception as e:  # noqa: BLE001
        problem = str(e)
    logger.warning("MLflow run %s not marked %s: %s", out.mlflow_run_id, status, redact(problem))


def register_from_checkpoint(
    cfg: Config,
    ckpt: Any,
    result: PretrainResult,
    *,
    alias: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Any:
    """Register the encoder of a finished run's checkpoint (a Ray ``Checkpoint``) as a model version, with its
    lineage."""
    from mae_service.model import create_model
    from mae_service.tracking import register_encoder
    from mae_service.tracking.register import CHECKPOINT_SHA_TAG
    from mae_service.train.checkpoint import load_model_weights, read_meta

    with ckpt.as_directory() as d:
        meta = read_meta(d)
        model = create_model(**meta.model_args)
        load_model_weights(d, model)
    tags = {
        "data_uri": sanitize_uri(cfg.data.train_uri),
        "data_format": cfg.data.format,
        "config_digest": cfg.digest(),
        "steps": str(meta.step),
        "final_loss": f"{meta.loss:.6g}",
        "run_name": result.run_name,
        "model_name": cfg.model.name,
    }
    weights = (meta.files or {}).get("model.safetensors") or {}
    if weights.get("sha256"):  # what makes a resubmit's registration reuse this version (see registered_before)
        tags[CHECKPOINT_SHA_TAG] = str(weights["sha256"])
    if result.metrics and "knn_top1" in result.metrics:
        tags["knn_top1"] = f"{result.metrics['knn_top1']:.4f}"
    tags.update(extra_tags or {})
    alias = alias or cfg.registry.alias
    mv = register_encoder(
        model,
        tracking_uri=result.tracking_uri,
        model_name=cfg.registry.model_name,
        alias=alias,
        run_id=result.mlflow_run_id,
        tags=clean_tags(tags),
        checkpoint_uri=result.checkpoint_uri,
        experiment=cfg.mlflow.experiment,
    )
    logger.debug("registered %s (alias @%s)", mv.uri, alias)
    return mv


def register_latest(
    cfg: Config, *, alias: str, metrics: dict[str, Any] | None = None, extra_tags: dict[str, str] | None = None
) -> Any:
    """Register the encoder of run ``cfg.train.run_name``'s latest checkpoint (None when it has none): what the
    sweep does with its best trial."""
    from ray.train import Checkpoint

    from mae_service.tracking.runs import find_run_by_name

    run_name = cfg.train.run_name
    assert run_name, "register_latest needs train.run_name"
    found = latest_checkpoint(cfg.train.storage_path, run_name, cfg.data.s3_endpoint)
    if found is None:
        return None
    path, fs, meta = found
    client, uri = connect(cfg.mlflow.tracking_uri, must_exist=False)
    result = PretrainResult(
        run_name,
        find_run_by_name(client, cfg.mlflow.experiment, run_name),
        uri,
        checkpoint_uri(cfg.train.storage_path, path),
        meta.step,
        meta.loss,
        metrics=metrics,
    )
    return register_from_checkpoint(cfg, Checkpoint(path, filesystem=fs), result, alias=alias, extra_tags=extra_tags)
