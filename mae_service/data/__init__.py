"""Data: list a dataset URI, then stream, decode and augment it with Ray Data.

Public interface (imported lazily so ``import mae_service.data`` stays light; Ray loads only with the datasets)::

    src = open_source(uri, fmt, shard_size=256, s3_endpoint=None)   # Source: .num_images .class_names .shards
    samples_per_rank(src, world_size, batch_size) -> int
    train_dataset(src, rank=, world_size=, image_size=, seed=, batch_size=, epochs=, start_sample=0) -> ray Dataset
    eval_dataset(src, image_size=) -> ray Dataset
    filesystem_for(uri, s3_endpoint=None) -> (pyarrow.fs.FileSystem, path)

Pure decoding/augmentation lives in :mod:`mae_service.data.decode`, synthetic data in :mod:`mae_service.data.synth`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "open_source": "mae_service.data.source",
    "samples_per_rank": "mae_service.data.source",
    "Source": "mae_service.data.source",
    "Shard": "mae_service.data.source",
    "FORMATS": "mae_service.data.source",
    "train_dataset": "mae_service.data.pipeline",
    "eval_dataset": "mae_service.data.pipeline",
    "ingest_options": "mae_service.data.pipeline",
    "filesystem_for": "mae_service.data.storage",
    "BadImageError": "mae_service.data.decode",
    "decode_image": "mae_service.data.decode",
    "random_resized_crop": "mae_service.data.decode",
    "center_crop": "mae_service.data.decode",
    "synthesize": "mae_service.data.synth",
}

__all__ = [
    "FORMATS", "BadImageError", "Shard", "Source", "center_crop", "decode_image", "eval_dataset", "filesystem_for",
    "ingest_options", "open_source", "random_resized_crop", "samples_per_rank", "synthesize", "train_dataset",
]

if TYPE_CHECKING:  # pragma: no cover
    from mae_service.data.decode import BadImageError, center_crop, decode_image, random_resized_crop
    from mae_service.data.pipeline import eval_dataset, ingest_options, train_dataset
    from mae_service.data.source import FORMATS, Shard, Source, open_source, samples_per_rank
    from mae_service.data.storage import filesystem_for
    from mae_service.data.synth import synthesize


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mae_service.data' has no attribute {name!r}")
