"""The driver of a pretraining run: preflight → MLflow run → TorchTrainer.fit → register.

Runs where the user's command runs (``mae-service pretrain``, or ``jobs/pretrain.py`` as a Ray job's driver).
Everything that can be checked without cluster resources is checked first, and all problems are raised at once.
A run is identified by ``train.run_name``: resubmitting the same name continues its checkpoints and its MLflow run.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from mae_service.config import Config, ConfigError
from mae_service.train.checkpoint import STEP_DIR, CheckpointMeta

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "mae.run_name"
# Settings that change how a run is stored or observed, not what it learns: they may differ on resume.
RESUMABLE_CHANGES = {"train.max_steps", "train.storage_path", "train.run_name", "train.max_failures",
                     "train.checkpoint_every_steps", "train.keep_checkpoints", "train.log_every_steps",
                     "train.picture_every_steps", "train.eval_every_steps", "train.num_workers",
                     "train.cpus_per_worker", "train.use_gpu", "train.amp", "train.micro_batch_size",
                     "data.decode_cpus", "data.train_uri", "data.val_uri", "data.s3_endpoint"}


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


def sanitize_uri(uri: str) -> str:
    """Drop any ``user:password@`` from a URI before it is logged or stored."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=host))
    return uri


def resolve_tracking_uri(uri: str) -> str:
    """A relative ``sqlite:///x.db`` becomes absolute, so Ray workers (other cwd) write to the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def check_tracking(uri: str, timeout: float = 5.0) -> str | None:
    """None if the tracking store answers; else the problem, in one line."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return None
        except Exception as e:  # noqa: BLE001
            return f"mlflow.tracking_uri={sanitize_uri(uri)!r} is unreachable: {e}"
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder):
            return f"mlflow.tracking_uri={uri!r}: folder {folder!r} does not exist"
    return None


def storage(uri: str, s3_endpoint: str | None):
    """(pyarrow filesystem, path) for a storage URI, local or s3://."""
    from mae_service.data import filesystem_for

    return filesystem_for(uri, s3_endpoint=s3_endpoint)


def latest_checkpoint(storage_path: str, run_name: str, s3_endpoint: str | None) -> tuple[str, Any, CheckpointMeta] | None:
    """The newest complete checkpoint of a run: (path on its filesystem, filesystem, meta), or None."""
    import pyarrow.fs as pafs

    fs, root = storage(storage_path, s3_endpoint)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return None
    steps = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and STEP_DIR.match(i.base_name)),
                   reverse=True)
    for path in steps:
        try:
            with fs.open_input_stream(f"{path}/meta.json") as f:
                return path, fs, CheckpointMeta.from_json(f.read().decode())
        except (OSError, FileNotFoundError):
            continue  # an incomplete upload: try the one before
    return None


def _config_changes(old: dict[str, Any], cfg: Config) -> list[str]:
    new = cfg.flat()
    flat_old = {f"{s}.{k}": v for s, sec in old.items() for k, v in sec.items()}
    out = []
    for key in sorted(set(new) | set(flat_old)):
        if key.startswith(("data.", "model.", "train.")) and key not in RESUMABLE_CHANGES:
            a, b = flat_old.get(key), new.get(key)
            if isinstance(a, list | tuple) and isinstance(b, list | tuple):
                a, b = list(a), list(b)
            if a != b:
                out.append(f"{key}: checkpoint has {a!r}, this job asks {b!r}")
    return out


def preflight(cfg: Config) -> tuple[Any, Any]:
    """Check data, validation data, tracking store and storage before any cluster work; raise all problems at once."""
    from mae_service.data import open_source

    problems: list[str] = []
    src = val = None
    ep = cfg.data.s3_endpoint
    try:
        src = open_source(cfg.data.train_uri, cfg.data.format, shard_size=cfg.data.shard_size, s3_endpoint=ep)
    except ValueError as e:
        problems.append(f"data.train_uri: {e}")
    if cfg.data.val_uri:
        try:
            val = open_source(cfg.data.val_uri, cfg.data.format, shard_size=cfg.data.shard_size, s3_endpoint=ep)
        except ValueError as e:
            problems.append(f"data.val_uri: {e}")
    tracking_problem = check_tracking(resolve_tracking_uri(cfg.mlflow.tracking_uri))
    if tracking_problem:
        problems.append(tracking_problem)
    if cfg.train.storage_path.startswith("s3://"):
        import pyarrow.fs as pafs

        try:
            fs, path = storage(cfg.train.storage_path, ep)
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                problems.append(f"train.storage_path={cfg.train.storage_path!r}: bucket {bucket!r} does not exist")
        except (OSError, ValueError) as e:
            problems.append(f"train.storage_path={cfg.train.storage_path!r}: {e}")
    if src is not None:
        from mae_service.data import samples_per_rank

        try:
            rows = samples_per_rank(src, cfg.train.num_workers, cfg.micro_batch)
        except ValueError as e:
            problems.append(f"data.train_uri: {e} (train.num_workers={cfg.train.num_workers}, "
                            f"micro-batch {cfg.micro_batch})")
            rows = None
        if rows is not None and rows // cfg.micro_batch // cfg.accum_steps < 1:
            problems.append(f"data.train_uri={cfg.data.train_uri!r} has {src.num_images} images: too few for one "
                            f"step of train.batch_size={cfg.train.batch_size} on {cfg.train.num_workers} workers")
    if problems:
        raise ConfigError(problems)
    return src, val


def init_ray(cfg: Config) -> None:
    """Connect to the cluster (``RAY_ADDRESS``, or inside a Ray job) or start a local one on loopback."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.decode_cpus
    ray.init(num_cpus=max(4, int(need + 1.999)), _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1",
             object_store_memory=min(2 << 30, int(os.environ.get("MAE_OBJECT_STORE_BYTES", 1 << 30))))


def check_resources(cfg: Config) -> None:
    """A job that can never be scheduled hangs forever in Ray: refuse it with the numbers instead."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    t = cfg.train
    problems = []
    if t.use_gpu and gpus < t.num_workers:
        problems.append(f"train.num_workers={t.num_workers} with train.use_gpu=true needs {t.num_workers} GPUs; "
                        f"the cluster has {gpus:g}")
    train_cpus = t.num_workers * t.cpus_per_worker
    if cpus - train_cpus < cfg.data.decode_cpus:
        problems.append(f"train.num_workers={t.num_workers} × train.cpus_per_worker={t.cpus_per_worker:g} leaves "
                        f"{cpus - train_cpus:g} of the cluster's {cpus:g} CPUs for data decoding, which needs "
                        f"data.decode_cpus={cfg.data.decode_cpus:g}")
    if problems:
        raise ConfigError(problems)


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if missing (with the embedded sqlite default, its artifacts go to a
    folder next to the database rather than the current directory)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    return client.create_experiment(name, artifact_location=artifact_location)


def _mlflow_run(cfg: Config, run_name: str, resume_run_id: str | None, tags: dict[str, str] | None = None) -> str:
    """Create (or find, for a resumed run) the run's MLflow run; log the resolved config as params."""
    import mlflow

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp_id = ensure_experiment(client, cfg.mlflow.experiment, uri)
    if resume_run_id is None:
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
        resume_run_id = found[0].info.run_id if found else None
    if resume_run_id is not None:
        client.update_run(resume_run_id, status="RUNNING")
        return resume_run_id
    run = client.create_run(exp_id, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, "mae.config_hash": cfg.digest(), **(tags or {})})
    params = {k: sanitize_uri(v) if isinstance(v, str) else v for k, v in cfg.flat().items()}
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def pretrain(cfg: Config, *, callbacks: list | None = None, mlflow_tags: dict[str, str] | None = None,
             register: bool | None = None) -> PretrainResult:
    """Run (or continue) the pretraining run described by ``cfg``; returns where its results are.

    ``callbacks`` go to Ray Train's RunConfig (a sweep passes Tune's report callback); ``mlflow_tags`` are set on a
    new MLflow run (a sweep passes ``mlflow.parentRunId``); ``register`` overrides ``registry.register``.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mae_service.data import ingest_options, samples_per_rank, train_dataset
    from mae_service.train.loop import train_loop_per_worker

    src, val = preflight(cfg)
    t = cfg.train
    run_name = t.run_name or time.strftime("mae-%Y%m%d-%H%M%S")
    ep = cfg.data.s3_endpoint
    found = latest_checkpoint(t.storage_path, run_name, ep)
    start_step, resume_from, resume_fs, mlflow_run_id = 0, None, None, None
    if found is not None:
        resume_from, resume_fs, meta = found
        changes = _config_changes(meta.config, cfg)
        if changes:
            raise ConfigError([f"train.run_name={run_name!r} already has checkpoints made with other settings "
                               f"(use another run name to start afresh): " + "; ".join(changes)])
        start_step, mlflow_run_id = meta.step, meta.mlflow_run_id
        logger.info("run %s: continuing from step %d (%s)", run_name, start_step, resume_from)

    rows = samples_per_rank(src, t.num_workers, cfg.micro_batch)
    steps_per_epoch = rows // cfg.micro_batch // cfg.accum_steps
    schedule_steps = steps_per_epoch * t.epochs
    total_steps = min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow_run_id = _mlflow_run(cfg, run_name, mlflow_run_id, mlflow_tags)
    init_ray(cfg)
    check_resources(cfg)

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the training loop logs progress
    rows_per_step = cfg.micro_batch * cfg.accum_steps
    start_rows = start_step * rows_per_step
    datasets = {
        f"train_{r}": train_dataset(src, rank=r, world_size=t.num_workers, image_size=cfg.data.image_size,
                                    seed=t.seed, batch_size=cfg.micro_batch, epochs=t.epochs, start_sample=start_rows,
                                    decode_cpus=cfg.data.decode_cpus)
        for r in range(t.num_workers)
    }
    knn = None
    if val is not None:
        knn = {"train_source": src, "val_source": val, "image_size": cfg.data.image_size, "k": t.knn_k,
               "max_train": 5000}
    loop_config = {
        "cfg": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "start_rows": start_rows,
        "resume_from": resume_from, "resume_filesystem": resume_fs, "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri, "knn": knn,
    }
    storage_fs, storage_root = storage(t.storage_path, ep)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_root, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest_options()),
    )
    if start_step >= total_steps:
        logger.info("run %s is already at step %d of %d: nothing to train", run_name, start_step, total_steps)
        checkpoint_uri = _uri_of(t.storage_path, resume_from, storage_root)
        return PretrainResult(run_name, mlflow_run_id, tracking_uri, checkpoint_uri, start_step, meta.loss)

    logger.info("run %s: %d steps (%d per epoch), %d workers, global batch %d (%d × %d accumulation), lr %.3g",
                run_name, total_steps, steps_per_epoch, t.num_workers, t.batch_size, cfg.micro_batch,
                cfg.accum_steps, cfg.lr)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    t_fit = time.monotonic()
    try:
        result = trainer.fit()
        logger.info("training finished in %.0f s", time.monotonic() - t_fit)
    except BaseException:
        client.set_terminated(mlflow_run_id, status="FAILED")
        raise
    ckpt = result.checkpoint
    metrics = dict(result.metrics or {})
    checkpoint_uri = _uri_of(t.storage_path, ckpt.path if ckpt else None, storage_root)
    client.set_tag(mlflow_run_id, "mae.checkpoint_uri", checkpoint_uri or "")
    out = PretrainResult(run_name, mlflow_run_id, tracking_uri, checkpoint_uri, int(metrics.get("step", 0)),
                         metrics.get("loss"), metrics=metrics)
    try:
        if (cfg.registry.register if register is None else register) and ckpt is not None:
            out.model_version = register_from_checkpoint(cfg, ckpt, out)
    finally:
        client.set_terminated(mlflow_run_id, status="FINISHED")
    return out


def register_from_checkpoint(cfg: Config, ckpt: Any, result: PretrainResult, *, alias: str | None = None,
                             extra_tags: dict[str, str] | None = None) -> Any:
    """Register the encoder of a finished run's last checkpoint as a model version, with its lineage."""
    from mae_service.model import create_model
    from mae_service.tracking import register_encoder
    from mae_service.train.checkpoint import load_model_weights, read_meta

    with ckpt.as_directory() as d:
        meta = read_meta(d)
        model = create_model(**meta.model_args)
        load_model_weights(d, model)
    tags = {"data_uri": sanitize_uri(cfg.data.train_uri), "data_format": cfg.data.format,
            "config_digest": cfg.digest(), "steps": str(meta.step), "final_loss": f"{meta.loss:.6g}",
            "run_name": result.run_name, "model_name": cfg.model.name}
    if result.metrics and "knn_top1" in result.metrics:
        tags["knn_top1"] = f"{result.metrics['knn_top1']:.4f}"
    tags.update(extra_tags or {})
    alias = alias or cfg.registry.alias
    mv = register_encoder(model, tracking_uri=result.tracking_uri, model_name=cfg.registry.model_name,
                          alias=alias, run_id=result.mlflow_run_id, tags=tags,
                          checkpoint_uri=result.checkpoint_uri, experiment=cfg.mlflow.experiment)
    logger.info("registered %s (alias @%s)", mv.uri, alias)
    return mv


def _uri_of(storage_path: str, fs_path: str | None, storage_root: str) -> str | None:
    """Map a checkpoint's filesystem path back to the user's URI form (s3://… or a local path)."""
    if fs_path is None:
        return None
    if storage_path.startswith("s3://"):
        return "s3://" + fs_path.lstrip("/")
    return fs_path
