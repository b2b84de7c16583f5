"""Preflight of a run: everything checkable before any cluster resource is used, all problems raised at once.

Opens the training and held-out data (listing them, and decoding their first few images: a dataset of which none
decodes fails here, naming one), checks the tracking store answers and the checkpoint
bucket exists, computes the step plan (too little data for one step is a problem too) and resolves ``train.amp``
where the driver can: on this machine's CPU for CPU runs (a local run's workers share it), on this machine's GPU
for GPU runs where the driver has one; otherwise the workers' devices decide (each worker resolves and logs too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mae_service.config import Config, ConfigError
from mae_service.tracking.runs import resolve_tracking_uri, tracking_problem
from mae_service.train.step import StepPlan

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What preflight opened: the training and (optional) held-out data sources and the step plan."""

    train: Any
    val: Any
    plan: StepPlan
    amp: str | None = None
    """``train.amp`` resolved by the driver (``bf16``, ``fp16``, ``fp32``), None when the workers decide."""


PROBE_IMAGES = 8
"""Images of each dataset the driver fetches and decodes before any worker starts."""


def _open(cfg: Config, key: str, uri: str, problems: list[str]) -> Any:
    from mae_service.data import open_source
    from mae_service.data.source import probe_images

    try:
        src = open_source(uri, cfg.data.format, shard_size=cfg.data.shard_size, s3_endpoint=cfg.data.s3_endpoint)
        good, bad = probe_images(src, PROBE_IMAGES)
    except ValueError as e:
        problems.append(f"{key}: {e}")
        return None
    if bad and not good:
        name, why = bad[0]
        problems.append(
            f"{key}={uri!r}: none of the first {len(bad)} images decodes (e.g. {name}: {why}); give a folder of "
            "JPEG/PNG/WebP/BMP/GIF/TIFF images (or wds/parquet shards of them, data.format)"
        )
        return None
    if bad:
        logger.warning(
            "%s: %d of the first %d images do not decode (e.g. %s: %s); bad images are skipped and counted",
            uri,
            len(bad),
            len(bad) + good,
            *bad[0],
        )
    return src


def checkpoint_bytes(cfg: Config) -> int:
    """About how many bytes one checkpoint of ``cfg``'s model takes: fp32 weights and AdamW's two moments."""
    import torch

    from mae_service.train.step import build_model

    with torch.device("meta"):  # shapes only: nothing is allocated
        n = sum(p.numel() for p in build_model(cfg).parameters())
    return 12 * n


def _local_storage_problem(cfg: Config) -> str | None:
    """A local ``train.storage_path`` must be (below) a folder this process can write, with room for a checkpoint."""
    import shutil
    import tempfile
    from pathlib import Path

    key, where = f"train.storage_path={cfg.train.storage_path!r}", "give a writable folder or s3://bucket/prefix"
    path = cfg.train.storage_path.removeprefix("file://")
    if "://" in path:
        return None  # another pyarrow filesystem: Ray Train reports what it refuses
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{key}: {str(folder)!r} is a file, not a folder; {where}"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".mae-write-test-"):
            pass
    except OSError as e:
        return f"{key}: cannot write in {str(folder)!r} ({e.strerror or e}); {where}"
    need, free = checkpoint_bytes(cfg), shutil.disk_usage(folder).free
    if free < need:
        return (
            f"{key}: {free / 2**20:.0f} MiB free, one checkpoint of {cfg.model.name} needs about {need / 2**20:.0f} MiB"
        )
    return None


def _storage_problem(cfg: Config) -> str | None:
    if not cfg.train.storage_path.startswith("s3://"):
        return _local_storage_problem(cfg)
    return s3_storage_problem(cfg)


def s3_storage_problem(cfg: Config) -> str | None:
    """An ``s3://`` ``train.storage_path`` whose bucket is missing or cannot be asked (None: fine, or not s3)."""
    if not cfg.train.storage_path.startswith("s3://"):
        return None
    import pyarrow.fs as pafs

    from mae_service.data.storage import filesystem_for

    try:
        fs, path = filesystem_for(cfg.train.storage_path, s3_endpoint=cfg.data.s3_endpoint)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"train.storage_path={cfg.train.storage_path!r}: bucket {bucket!r} does not exist"
    except (OSError, ValueError) as e:
        return f"train.storage_path={cfg.train.storage_path!r}: {e}"
    return None


def driver_amp(cfg: Config, problems: list[str]) -> str | None:
    """What ``train.amp`` resolves to on this process's device (None: decided on the GPU workers); a problem
    appended to ``problems`` where the device cannot run it."""
    import torch

    from mae_service.model.precision import amp_name, resolve_amp

    if cfg.train.use_gpu and not torch.cuda.is_available():
        return None  # a driver without a GPU (e.g. a cluster's head): the GPU workers decide
    try:
        return amp_name(resolve_amp(cfg.train.amp, "cuda" if cfg.train.use_gpu else "cpu"))
    except ValueError as e:
        problems.append(str(e))
        return None


def plan_steps(cfg: Config, src: Any) -> StepPlan:
    """How ``cfg``'s run over ``src`` maps onto optimiser steps (ValueError when the data cannot be split)."""
    from mae_service.data import samples_per_rank

    return StepPlan.for_config(cfg, samples_per_rank(src, cfg.train.num_workers, cfg.micro_batch))


def preflight(cfg: Config) -> Inputs:
    """Check data, held-out data, tracking store and storage before any cluster work; raise all problems at once."""
    problems: list[str] = []
    amp = driver_amp(cfg, problems)
    src = _open(cfg, "data.train_uri", cfg.data.train_uri, problems)
    val = _open(cfg, "data.val_uri", cfg.data.val_uri, problems) if cfg.data.val_uri else None
    for problem in (
        tracking_problem(resolve_tracking_uri(cfg.mlflow.tracking_uri), must_exist=False),
        _storage_problem(cfg),
    ):
        if problem:
            problems.append(problem)
    plan = None
    if src is not None:
        try:
            plan = plan_steps(cfg, src)
        except ValueError as e:
            problems.append(
                f"data.train_uri: {e} (train.num_workers={cfg.train.num_workers}, micro-batch {cfg.micro_batch})"
            )
        if plan is not None and plan.steps_per_epoch < 1:
            problems.append(
                f"data.train_uri={cfg.data.train_uri!r} has {src.num_images} images: too few for one "
                f"step of train.batch_size={cfg.train.batch_size} on {cfg.train.num_workers} workers"
            )
    if problems:
        raise ConfigError(problems)
    assert plan is not None
    return Inputs(src, val, plan, amp)
