"""Convert a folder of images (``files`` layout, local or ``s3://``) into shards of a sharded format.

The target is any format registered with ``pack_target`` (:data:`mae_service.data.formats.PACK_TARGETS`: WebDataset
tars, Parquet files).

Objects are copied byte for byte (no re-encoding); the order is shuffled with a seed so every shard mixes
classes; an ``_index.json`` with class names and per-shard counts lets :func:`~mae_service.data.open_source`
list the result without reading the shards. No Ray.
"""

from __future__ import annotations

import logging
import posixpath
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mae_service.data import formats
from mae_service.data.source import open_source
from mae_service.data.synth import progress_bar, write_items

logger = logging.getLogger(__name__)


def pack(
    src_uri: str,
    out: str,
    *,
    fmt: str,
    shard_size: int = 1000,
    seed: int = 0,
    s3_endpoint: str | None = None,
    progress: bool = False,
) -> int:
    """Pack the images under ``src_uri`` into ``fmt`` shards of ``shard_size`` under ``out``; returns the count."""
    formats.get(fmt, pack_target=True, what=f"--format={fmt!r}")
    if shard_size < 1:
        raise ValueError(f"--shard-size={shard_size}: must be ≥ 1")
    src = open_source(src_uri, formats.FOLDER, shard_size=shard_size, s3_endpoint=s3_endpoint)
    fs, _ = src.filesystem()
    entries = [(shard.key(i), shard.label(i)) for shard in src.shards for i in range(shard.count)]
    entries.sort()
    order = np.random.default_rng(seed).permutation(len(entries))

    def read(i: int) -> tuple[str, bytes, str, int]:
        key, label = entries[i]
        with fs.open_input_stream(key) as f:
            data = f.read()
        stem, ext = posixpath.splitext(posixpath.basename(key))
        # WebDataset keys must not contain dots; keep them unique with the listing index.
        return f"{i:08d}_{stem.replace('.', '_')}", data, ext.lstrip(".").lower(), label

    def items() -> Iterator[tuple[str, bytes, str, int]]:
        window = 64  # bounded read-ahead: memory stays flat however many images there are
        with ThreadPoolExecutor(16) as pool:
            pending = deque(pool.submit(read, int(i)) for i in order[:window])
            for i in order[window:]:
                yield pending.popleft().result()
                pending.append(pool.submit(read, int(i)))
            while pending:
                yield pending.popleft().result()

    with progress_bar(len(entries), f"pack {fmt}", progress) as on_item:
        n = write_items(
            out, fmt, items(), src.class_names, shard_size=shard_size, s3_endpoint=s3_endpoint, on_item=on_item
        )
    logger.info("packed %d images from %s into %s shards under %s", n, src_uri, fmt, out)
    return n
