"""The driver of a fine-tune: preflight → MLflow run → ``TorchTrainer.fit`` → register the classifier → record.

The same machinery as pretraining (:mod:`mae_service.train.driver`): a run is identified by
``finetune.run_name`` (resubmitting the same name continues its checkpoints and its MLflow run, refusing other
settings), DDP over ``train.num_workers``, checkpoints under ``train.storage_path``, the Ray Data pipeline with
labels. At the end the classifier is registered (default ``<source name>-ft``) and its top-1 recorded on the
source encoder version as ``eval.<protocol>_top1``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from mae_service.config import Config, ConfigError
from mae_service.finetune.preflight import FinetuneInputs, preflight
from mae_service.tracking.runs import (
    TrackingUnavailableError,
    connect,
    resolve_tracking_uri,
    sanitize_uri,
)
from mae_service.train.checkpoint import checkpoint_uri, latest_checkpoint
from mae_service.train.driver import open_mlflow_run, record_and_close, recorded_through, replay_spool
from mae_service.train.spool import Spool
from mae_service.train.trainer import ray_trainer, start_ray

__all__ = ["FinetuneResult", "finetune", "protocol"]

logger = logging.getLogger(__name__)
# What defines a fine-tune (a resubmitted run must ask the same): the source, the recipe, the seed.
RUN_KEYS = tuple(
    f"finetune.{k}"
    for k in (
        "model_uri blocks from_scratch epochs batch_size blr min_lr weight_decay betas layer_decay drop_path "
        "smoothing mixup cutmix warmup_epochs"
    ).split()
) + ("train.seed", "data.format")


def protocol(blocks: int | None, from_scratch: bool) -> str:
    """``finetune`` (all blocks), ``partial<K>``, ``linear`` (K = 0) or ``scratch``: the name results go under."""
    if from_scratch:
        return "scratch"
    return "finetune" if blocks is None else "linear" if blocks == 0 else f"partial{blocks}"


@dataclass
class FinetuneResult:
    top1: float
    top5: float | None
    blocks: int | None
    from_scratch: bool
    model_uri: str
    classifier_uri: str | None
    mlflow_run_id: str
    epochs: int
    step: int = 0
    run_name: str = ""
    source_uri: str = ""
    checkpoint_uri: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """What ``--json FILE`` writes."""
        keys = ("top1", "top5", "blocks", "from_scratch", "model_uri", "classifier_uri", "mlflow_run_id", "epochs")
        return {k: getattr(self, k) for k in keys}


def _pinned(cfg: Config, inputs: FinetuneInputs) -> Config:
    """``cfg`` with the source pinned to the version preflight resolved (an alias may move meanwhile)."""
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, model_uri=inputs.source_uri))


def _resume(cfg: Config, run_name: str) -> tuple[Any, Any, Any]:
    found = latest_checkpoint(cfg.train.storage_path, run_name, cfg.data.s3_endpoint)
    if found is None:
        return None, None, None
    path, fs, meta = found
    flat = cfg.flat()
    changes = []
    for key in RUN_KEYS:
        sec, name = key.split(".")
        old, new = (meta.config.get(sec) or {}).get(name), flat[key]
        if (list(old) if isinstance(old, list | tuple) else old) != (list(new) if isinstance(new, tuple) else new):
            changes.append(f"{key}: checkpoint has {old!r}, this job asks {new!r}")
    if changes:
        raise ConfigError(
            [f"finetune.run_name={run_name!r} already has checkpoints made with other settings: " + "; ".join(changes)]
        )
    logger.info("fine-tune %s: continuing from step %d (%s)", run_name, meta.step, path)
    return path, fs, meta


def _trainer(cfg: Config, inputs: FinetuneInputs, loop_config: dict[str, Any], run_name: str, start_rows: int) -> Any:
    from mae_service.finetune.loop import finetune_loop_per_worker

    return ray_trainer(
        cfg,
        finetune_loop_per_worker,
        loop_config,
        run_name,
        inputs.train,
        image_size=inputs.arch["image_size"],
        micro_batch=inputs.plan.micro_batch,
        epochs=cfg.finetune.epochs,
        start_rows=start_rows,
    )


def finetune(cfg: Config, *, mlflow_tags: dict[str, str] | None = None) -> FinetuneResult:
    """Run (or continue) the fine-tune ``cfg`` describes; returns its scores and where they are recorded.
    ``mlflow_tags`` go on a new MLflow run (the report passes ``mlflow.parentRunId``)."""
    t0 = time.monotonic()
    inputs = preflight(cfg)
    asked, cfg = cfg.finetune.model_uri, _pinned(cfg, inputs)
    ft, t, plan = cfg.finetune, cfg.train, inputs.plan
    proto = protocol(ft.blocks, ft.from_scratch)
    run_name = (
        ft.run_name or f"ft-{inputs.source_name}-v{inputs.source_version}-{proto}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    resume_from, resume_fs, meta = _resume(cfg, run_name)
    start_step = meta.step if meta else 0
    tags = {
        "mae_service.kind": "finetune",
        "mae_service.protocol": proto,
        "mae_service.source_model_uri": inputs.source_uri,
        "mae_service.source_model_version": str(inputs.source_version),
        "mae_service.source_run": inputs.source_run or "",
        "mae_service.asked_model_uri": str(asked),
        **(mlflow_tags or {}),
    }
    run_id = open_mlflow_run(cfg, run_name, meta.mlflow_run_id if meta else None, tags, amp=inputs.amp)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = connect(tracking_uri, must_exist=False)[0]
    # As in pretraining: what an interrupted submission could not record is replayed into the same run first, and
    # the steps it recorded after its last checkpoint are re-trained but not recorded twice.
    spool = Spool(t.storage_path, run_name, cfg.data.s3_endpoint)
    replay_spool(spool, tracking_uri)
    recorded = recorded_through(tracking_uri, run_id) if meta is not None else -1
    if meta is not None and start_step >= plan.total_steps:
        from ray.train import Checkpoint

        logger.info(
            "fine-tune %s is already at step %d of %d: nothing to train", run_name, start_step, plan.total_steps
        )
        progress = meta.config.get("_progress") or {}
        ckpt, metrics = Checkpoint(resume_from, filesystem=resume_fs), progress
    else:
        import ray

        start_ray(cfg)
        state = inputs.encoder_state
        loop_config = {
            "cfg": cfg.to_dict(),
            "plan": plan.to_dict(),
            "arch": inputs.arch,
            "encoder_ref": ray.put({k: v.numpy() for k, v in state.items()}) if state is not None else None,
            "val_source": inputs.val,
            "start_rows": start_step * plan.rows_per_step,
            "resume_from": resume_from,
            "resume_filesystem": resume_fs,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "spool": spool.to_dict(),
            "recorded_through": recorded,
        }
        trainer = _trainer(cfg, inputs, loop_config, run_name, start_step * plan.rows_per_step)
        logger.info(
            "fine-tune %s (%s of %s): %d steps (%d per epoch), %d workers, batch %d, lr %.3g",
            run_name, proto, inputs.source_uri, plan.total_steps, plan.steps_per_epoch, t.num_workers,
            ft.batch_size, ft.blr * ft.batch_size / 256,
        )  # fmt: skip
        try:
            result = trainer.fit()
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        ckpt, metrics = result.checkpoint, dict(result.metrics or {})
    out = FinetuneResult(
        top1=float(metrics.get("val_top1", float("nan"))),
        top5=metrics.get("val_top5"),
        blocks=ft.blocks,
        from_scratch=ft.from_scratch,
        model_uri=inputs.source_uri,
        classifier_uri=None,
        mlflow_run_id=run_id,
        epochs=ft.epochs,
        step=int(metrics.get("step", start_step)),
        run_name=run_name,
        source_uri=inputs.source_uri,
        checkpoint_uri=checkpoint_uri(t.storage_path, ckpt.path if ckpt else None),
    )
    _finish_record(cfg, inputs, out, ckpt, proto, spool, client)
    out.seconds = round(time.monotonic() - t0, 1)
    return out


def _finish_record(
    cfg: Config, inputs: FinetuneInputs, out: FinetuneResult, ckpt: Any, proto: str, spool: Spool, client: Any
) -> None:
    """The spool replayed, the classifier registered, the run closed FINISHED (:func:`record_and_close`); when the
    tracking server does not answer (training never waited on it), the checkpoint stays, what rank 0 could not
    deliver stays in ``spool``, and :class:`TrackingUnavailableError` says to resubmit (the resubmit finds the run
    trained and only records it). ``client``: made when the run opened."""
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    if record_and_close(
        client, uri, out.mlflow_run_id, spool, lambda: _record(cfg, inputs, out, ckpt, proto, client, uri)
    ):
        return
    raise TrackingUnavailableError(
        f"fine-tune {out.run_name} finished at step {out.step} (checkpoint {out.checkpoint_uri}) but the MLflow "
        f"tracking server {sanitize_uri(uri)} is unreachable; what it did not get is kept in {spool.uri}: resubmit "
        "the same command to finish the MLflow record"
    )


def _record(cfg: Config, inputs: FinetuneInputs, out: FinetuneResult, ckpt: Any, proto: str, client, uri: str) -> None:
    """Register the classifier (``finetune.register``), tag the run, record top-1 on the source version."""
    from mae_service.model.classifier import create_classifier
    from mae_service.tracking.classifiers import record_finetune, register_classifier
    from mae_service.train.checkpoint import load_model_weights

    ft = cfg.finetune
    client.set_tag(out.mlflow_run_id, "mae.checkpoint_uri", out.checkpoint_uri or "")
    if ft.register and ckpt is not None:
        model = create_classifier(inputs.arch)
        with ckpt.as_directory() as d:
            load_model_weights(d, model)
        tags = {
            "source_model_uri": inputs.source_uri,
            "source_model_name": inputs.source_name,
            "source_model_version": inputs.source_version,
            "source_run": inputs.source_run or "",
            "protocol": proto,
            "blocks": "all" if ft.blocks is None else ft.blocks,
            "from_scratch": ft.from_scratch,
            "data_uri": sanitize_uri(cfg.data.train_uri),
            "val_uri": sanitize_uri(cfg.data.val_uri or ""),
            "epochs": ft.epochs,
            "steps": out.step,
            "top1": f"{out.top1:.4f}",
            "class_names": json.dumps(inputs.arch.get("class_names", [])),
            "checkpoint_uri": out.checkpoint_uri,
        }
        reg = register_classifier(
            model,
            inputs.arch,
            tracking_uri=uri,
            model_name=ft.model_name or f"{inputs.source_name}-ft",
            alias=ft.alias,
            run_id=out.mlflow_run_id,
            tags=tags,
        )
        out.classifier_uri = reg.uri
        client.set_tag(out.mlflow_run_id, "mae_service.classifier_uri", reg.uri)
    record_finetune(
        inputs.source_uri, proto, {"top1": out.top1, "top5": out.top5}, tracking_uri=uri, run_id=out.mlflow_run_id
    )
