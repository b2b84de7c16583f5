"""Dataset sources: list a URI once, in the driver, into shards with known item counts. No Ray.

A :class:`Source` is a listed dataset: its shards (:class:`Shard`, one read unit each) in a fixed order, each
with its item count, and the class names. How a URI is listed, and how a shard is read back, is up to its format
(``data.format``, one of :data:`mae_service.data.formats.NAMES`; each format's module there says how it lays out
images and labels, how it shards and how it numbers items).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from mae_service.data import formats
from mae_service.data.storage import filesystem_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One read unit. ``count`` items; item ``i`` has global id ``ids[i]`` (files) or ``first_id + i``."""

    path: str
    """The tar or Parquet file (path inside the filesystem); empty for ``files``."""
    count: int
    first_id: int = 0
    keys: tuple[str, ...] = ()
    """``files``: the images' paths inside the filesystem."""
    labels: tuple[int, ...] = ()
    """``files``: their labels."""
    ids: tuple[int, ...] = ()
    """``files``: their global ids."""
    row_group: int = -1
    """``parquet``: the row group."""

    def item_id(self, i: int) -> int:
        return self.ids[i] if self.ids else self.first_id + i

    def name(self, i: int | None = None) -> str:
        if self.keys:
            return self.keys[i] if i is not None else f"{self.keys[0]} (+{self.count - 1} more)"
        where = f"{self.path}#rg{self.row_group}" if self.row_group >= 0 else self.path
        return f"{where}[{i}]" if i is not None else where


@dataclass
class Source:
    """A listed dataset: what :func:`mae_service.data.train_dataset` and ``eval_dataset`` read."""

    uri: str
    fmt: str
    shards: list[Shard]
    class_names: list[str] = field(default_factory=list)
    s3_endpoint: str | None = None
    image_column: str | None = None
    """``parquet``: the image column (``col`` or ``col.bytes`` for a struct)."""
    label_column: str | None = None

    @property
    def num_images(self) -> int:
        return sum(s.count for s in self.shards)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return filesystem_for(self.uri, self.s3_endpoint)

    def __repr__(self) -> str:
        return (
            f"Source({self.uri!r}, fmt={self.fmt!r}, num_images={self.num_images}, shards={len(self.shards)}, "
            f"classes={len(self.class_names)})"
        )


def open_source(uri: str, fmt: str, *, shard_size: int = 256, s3_endpoint: str | None = None) -> Source:
    """List ``uri`` once (in the calling process) into a :class:`Source` of shards with known counts.

    Raises ``ValueError`` naming the URI for a missing bucket or folder, wrong credentials, an unreachable
    endpoint, no images, or an unknown format.
    """
    listing_format = formats.get(fmt)
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be ≥ 1")
    fs, root = filesystem_for(uri, s3_endpoint)
    root = root.rstrip("/") or root
    found = listing_format.open_dataset(uri, fs, root, shard_size=shard_size)
    src = Source(
        uri=uri,
        fmt=fmt,
        shards=found.shards,
        class_names=found.class_names,
        s3_endpoint=s3_endpoint,
        image_column=found.image_column,
        label_column=found.label_column,
    )
    logger.info("opened %r", src)
    return src


def samples_per_rank(src: Source, world_size: int, batch_size: int) -> int:
    """Rows each rank gets per epoch: the same for every rank and a multiple of ``batch_size`` (remainder dropped).

    ``batch_size`` is the per-rank batch the loader yields.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size={world_size}, batch_size={batch_size}: both must be ≥ 1")
    n = (src.num_images // world_size) // batch_size * batch_size
    if n == 0:
        raise ValueError(
            f"data source {src.uri!r} has {src.num_images} images: too few for {world_size} ranks × "
            f"batches of {batch_size}"
        )
    return n
