"""Starting or joining Ray, and checking that a job can be scheduled on what the cluster has.

Owns: ``ray.init`` (on loopback when local), the resource checks that turn "waits forever" into an error.
Imports: Ray (lazily) and nothing from the rest of ``mae_service`` — every caller passes numbers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mae_service.local_ray import RayInstanceConflict, start_local_ray

__all__ = ["RayInstanceConflict", "cluster_cpus_gpus", "init_ray", "quiet_output", "resource_problems"]

_OUTPUT = {"quiet": False}
# Libraries whose INFO lines (plans, progress, "View run at …") a user does not need unless they ask with -v.
NOISY_LOGGERS = ("ray", "mlflow", "alembic", "urllib3", "botocore", "filelock", "torch")
# No usage reports, telemetry, hub lookups or cloud metadata probes: the service runs offline unless told otherwise.
OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def offline_defaults() -> None:
    """Set :data:`OFFLINE_ENV` where the user has not set those variables (call before importing Ray/MLflow)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


class ExitError(RuntimeError):
    """An error that ends a command with its one-line message and exit code ``code`` (not a traceback)."""

    code = 2


def quiet_output(quiet: bool = True) -> None:
    """Readable output for a person at a terminal: Ray's and MLflow's own lines (worker logs with their
    ``(RayTrainWorker pid=…)`` prefixes, Ray Data's plans and bars, MLflow's download bars) are hidden unless
    ``quiet`` is False (``mae-service -v``); warnings and errors still show. Applies to Ray started afterwards."""
    _OUTPUT["quiet"] = quiet
    if not quiet:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out": it is on by
    # design (DESIGN.md); the line tells a user of the service nothing to do. Shown with -v.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def output_is_quiet() -> bool:
    return _OUTPUT["quiet"]


def init_ray(cpus_needed: float = 0.0, *, dashboard: bool = False) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (or the one a Ray job runs in), else start a local Ray on 127.0.0.1.

    A local Ray gets at least 4 logical CPUs and at least ``cpus_needed`` rounded up: Ray Train workers and Ray
    Data tasks must both fit, or the job waits forever for resources. It is this run's own instance
    (:func:`start_local_ray`): every port on loopback, its own temp dir, leftovers of a killed run's instance
    stopped first, and a refusal (:class:`RayInstanceConflict`) when another Ray runs on this machine. Does nothing
    when Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    quiet: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING) if _OUTPUT["quiet"] else {}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**({"log_to_driver": True} | quiet))
        _quiet_ray_data()
        return
    start_local_ray(num_cpus=max(4, int(cpus_needed + 0.999)), dashboard=dashboard, **quiet)
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    """No Ray Data progress bars or execution plans on the driver when output is quiet."""
    if not _OUTPUT["quiet"]:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # its only lines are "Progress bars disabled. To enable, set …": what quiet output asked for
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_cpus_gpus() -> tuple[float, float]:
    """``(CPUs, GPUs)`` the cluster has in total."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def resource_problems(
    *, num_workers: int, cpus_per_worker: float, use_gpu: bool, decode_cpus: float, what: str = "the job"
) -> list[str]:
    """Why ``num_workers`` training workers plus one decode task can never be scheduled here (empty: they can)."""
    cpus, gpus = cluster_cpus_gpus()
    problems = []
    if use_gpu and gpus < num_workers:
        problems.append(
            f"train.num_workers={num_workers} with train.use_gpu=true needs {num_workers} GPUs for "
            f"{what}; the cluster has {gpus:g}"
        )
    train_cpus = num_workers * cpus_per_worker
    if cpus - train_cpus < decode_cpus:
        problems.append(
            f"train.num_workers={num_workers} × train.cpus_per_worker={cpus_per_worker:g} leaves "
            f"{cpus - train_cpus:g} of the cluster's {cpus:g} CPUs for data decoding, which needs "
            f"data.decode_cpus={decode_cpus:g}"
        )
    return problems
