"""The Ray Train ``TorchTrainer`` every run trains with: pretraining (:mod:`mae_service.train.driver`) and
fine-tuning (:mod:`mae_service.finetune.driver`) differ only in their loop, its config and the crop size."""

from __future__ import annotations

from typing import Any

from mae_service.config import Config, ConfigError
from mae_service.runtime import init_ray, resource_problems


def start_ray(cfg: Config) -> None:
    """Start (or join) Ray with room for the run's workers and its decoding; ConfigError when the cluster can never
    schedule them (instead of waiting forever)."""
    from mae_service.data import local_cpus_needed

    t = cfg.train
    init_ray(
        local_cpus_needed(
            num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, decode_cpus=cfg.data.decode_cpus
        ),
        dashboard=True,
    )
    problems = resource_problems(
        num_workers=t.num_workers,
        cpus_per_worker=t.cpus_per_worker,
        use_gpu=t.use_gpu,
        decode_cpus=cfg.data.decode_cpus,
    )
    if problems:
        raise ConfigError(problems)


def ray_trainer(
    cfg: Config,
    loop: Any,
    loop_config: dict[str, Any],
    run_name: str,
    source: Any,
    *,
    image_size: int,
    micro_batch: int,
    epochs: int,
    start_rows: int,
    callbacks: list | None = None,
    decode_device: str = "cpu",
) -> Any:
    """The ``TorchTrainer`` a run trains with (pretraining and fine-tuning alike): ``loop`` on
    ``train.num_workers`` ranks, one deterministic Ray Data stream of ``source`` per rank (dataset ``train_<rank>``,
    starting at row ``start_rows``), checkpoints under ``train.storage_path``, ``train.max_failures`` restarts, and
    MLflow's auth variables in the workers' runtime env (:func:`worker_env`). ``decode_device="cuda"``: the
    streams carry encoded bytes, which ``loop`` decodes on its GPU (pretraining's loop does)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mae_service.data import decode_tasks_per_rank, ingest_options, train_dataset
    from mae_service.data.storage import filesystem_for
    from mae_service.runtime import cluster_cpus_gpus
    from mae_service.train.checkpoint import drop_broken_run_state

    t = cfg.train
    max_tasks = decode_tasks_per_rank(
        cluster_cpus_gpus()[0],
        num_workers=t.num_workers,
        cpus_per_worker=t.cpus_per_worker,
        decode_cpus=cfg.data.decode_cpus,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False  # the training loop logs progress
    datasets = {
        f"train_{r}": train_dataset(
            source,
            rank=r,
            world_size=t.num_workers,
            image_size=image_size,
            seed=t.seed,
            batch_size=micro_batch,
            epochs=epochs,
            start_sample=start_rows,
            decode_cpus=cfg.data.decode_cpus,
            decode_device=decode_device,
            max_tasks=max_tasks,
        )
        for r in range(t.num_workers)
    }
    storage_fs, storage_root = filesystem_for(t.storage_path, s3_endpoint=cfg.data.s3_endpoint)
    drop_broken_run_state(storage_fs, f"{storage_root.rstrip('/')}/{run_name}")  # else Ray Train cannot resume
    auth = worker_env()
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_root,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": auth} if auth else None,  # type: ignore[call-arg]
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest_options()),
    )


def worker_env() -> dict[str, str]:
    """MLflow's auth variables (:data:`~mae_service.config.fields.AUTH_ENV`) where set: what the workers need to log
    to a server that wants credentials. Passed in the workers' runtime env, never in their config."""
    import os

    from mae_service.config.fields import AUTH_ENV

    return {k: os.environ[k] for k in AUTH_ENV if os.environ.get(k)}
