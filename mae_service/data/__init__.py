"""Data: list a dataset URI, then stream, decode and augment it with Ray Data; write synthetic or packed datasets.

Owns: reaching storage (local paths and ``s3://``, :mod:`~mae_service.data.storage`), the data formats (one module
each under :mod:`~mae_service.data.formats`, whose ``__init__`` is the one registry of them), listing a dataset into
shards (:mod:`~mae_service.data.source`), the per-rank read plan and the Ray Data datasets
(:mod:`~mae_service.data.pipeline`), image decoding and crops (:mod:`~mae_service.data.decode`), synthetic images
(:mod:`~mae_service.data.synth`), ``files`` → shards conversion (:mod:`~mae_service.data.pack`), the ``files`` manifest
(``_mae_manifest.parquet``, :func:`mae_service.data.formats.files.write_manifest`) and the
``mae-service data`` subcommands (:mod:`~mae_service.data.commands`).

May import: the standard library, numpy, pyarrow, PIL, boto3/botocore, tqdm (progress bars) and ``ray.data`` (in
:mod:`~mae_service.data.pipeline` only, inside functions); nothing from other ``mae_service`` packages (but ``mae_service.lazy``), which
import this one instead. ``import mae_service.data`` and ``mae_service.data.formats`` import nothing heavy.

Public interface (imported lazily so ``import mae_service.data`` stays light; Ray loads only with the datasets)::

    src = open_source(uri, fmt, shard_size=256, s3_endpoint=None)   # Source: .num_images .class_names .shards
    samples_per_rank(src, world_size, batch_size) -> int
    train_dataset(src, rank=, world_size=, image_size=, seed=, batch_size=, epochs=, start_sample=0) -> ray Dataset
    eval_dataset(src, image_size=) -> ray Dataset
    filesystem_for(uri, s3_endpoint=None) -> (pyarrow.fs.FileSystem, path)
    FORMATS                                                          # = formats.NAMES

Pure decoding/augmentation lives in :mod:`mae_service.data.decode`, synthetic data in :mod:`mae_service.data.synth`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae_service.lazy import lazy_exports

_EXPORTS = {  # name → module; FORMATS is formats.NAMES
    "open_source": "mae_service.data.source",
    "samples_per_rank": "mae_service.data.source",
    "Source": "mae_service.data.source",
    "Shard": "mae_service.data.source",
    "FORMATS": "mae_service.data.formats:NAMES",
    "train_dataset": "mae_service.data.pipeline",
    "eval_dataset": "mae_service.data.pipeline",
    "ingest_options": "mae_service.data.pipeline",
    "decode_tasks_per_rank": "mae_service.data.pipeline",
    "local_cpus_needed": "mae_service.data.pipeline",
    "filesystem_for": "mae_service.data.storage",
    "BadImageError": "mae_service.data.decode",
    "decode_image": "mae_service.data.decode",
    "random_resized_crop": "mae_service.data.decode",
    "center_crop": "mae_service.data.decode",
    "synthesize": "mae_service.data.synth",
}

__all__ = [
    "FORMATS",
    "BadImageError",
    "Shard",
    "Source",
    "center_crop",
    "decode_image",
    "eval_dataset",
    "filesystem_for",
    "ingest_options",
    "decode_tasks_per_rank",
    "local_cpus_needed",
    "open_source",
    "random_resized_crop",
    "samples_per_rank",
    "synthesize",
    "train_dataset",
]

if TYPE_CHECKING:  # pragma: no cover
    from mae_service.data.decode import BadImageError, center_crop, decode_image, random_resized_crop
    from mae_service.data.formats import NAMES as FORMATS
    from mae_service.data.pipeline import (
        decode_tasks_per_rank,
        eval_dataset,
        ingest_options,
        local_cpus_needed,
        train_dataset,
    )
    from mae_service.data.source import Shard, Source, open_source, samples_per_rank
    from mae_service.data.storage import filesystem_for
    from mae_service.data.synth import synthesize


__getattr__ = lazy_exports(__name__, _EXPORTS)
