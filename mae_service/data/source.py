"""Dataset sources: list a URI once, in the driver, into shards with known item counts. No Ray.

A :class:`Source` is a listed dataset: its shards (:class:`Shard`, one read unit each) in a fixed order, each
with its item count, and the class names. How a URI is listed, and how a shard is read back, is up to its format
(``data.format``, one of :data:`mae_service.data.formats.NAMES`; each format's module there says how it lays out
images and labels, how it shards and how it numbers items).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from mae_service.data import formats
from mae_service.data.storage import filesystem_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FileItems:
    """The loose files of one shard in compact arrays (a few bytes per item beyond the key's own bytes, and
    pickled as a handful of buffers, not one Python object per key): what a decode task needs to fetch them."""

    prefix: str
    """Joined in front of every key (the dataset's root and ``/``): stored once, not once per key."""
    blob: bytes
    """The keys (relative to ``prefix``), UTF-8, one after the other."""
    offsets: np.ndarray
    """int32 ``[n + 1]``: key ``i`` is ``blob[offsets[i]:offsets[i + 1]]``."""
    labels: np.ndarray
    """int32 ``[n]``."""
    ids: np.ndarray
    """int64 ``[n]``: global item ids (indices in the sorted listing)."""

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, i: int) -> str:
        return self.prefix + self.blob[self.offsets[i] : self.offsets[i + 1]].decode()

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.offsets.nbytes + self.labels.nbytes + self.ids.nbytes


@dataclass(frozen=True)
class Shard:
    """One read unit. ``count`` items; item ``i`` has global id ``files.ids[i]`` (files) or ``first_id + i``."""

    path: str
    """The tar or Parquet file (path inside the filesystem); empty for ``files``."""
    count: int
    first_id: int = 0
    row_group: int = -1
    """``parquet``: the row group."""
    files: FileItems | None = None
    """``files``: the images' keys, labels and ids."""

    def item_id(self, i: int) -> int:
        return int(self.files.ids[i]) if self.files is not None else self.first_id + i

    def key(self, i: int) -> str:
        """``files``: item ``i``'s path inside the filesystem."""
        assert self.files is not None, "only loose files have keys"
        return self.files.key(i)

    def label(self, i: int) -> int:
        """``files``: item ``i``'s label (-1: none)."""
        assert self.files is not None, "only loose files have labels in the listing"
        return int(self.files.labels[i])

    @property
    def labels(self) -> np.ndarray:
        """``files``: the items' labels (int32); empty for the other formats (their labels are in the shard)."""
        return self.files.labels if self.files is not None else np.zeros(0, np.int32)

    def name(self, i: int | None = None) -> str:
        if self.files is not None:
            return self.key(i) if i is not None else f"{self.key(0)} (+{self.count - 1} more)"
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

    @property
    def listing_bytes(self) -> int:
        """Memory the listing's per-item arrays take (loose files; 0 for the sharded formats)."""
        return sum(s.files.nbytes for s in self.shards if s.files is not None)

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
    # Said once per dataset and process (a demo or report opens the same folders for every row): later opens at debug.
    level = logging.DEBUG if (uri, fmt) in _ANNOUNCED else logging.INFO
    _ANNOUNCED.add((uri, fmt))
    if src.listing_bytes:
        logger.log(level, "opened %r; the listing holds %.1f MB", src, src.listing_bytes / 1e6)
    else:
        logger.log(level, "opened %r", src)
    return src


_ANNOUNCED: set[tuple[str, str]] = set()


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


def probe_images(src: Source, n: int = 8) -> tuple[int, list[tuple[str, str]]]:
    """Fetch and fully decode the first ``n`` images of ``src`` (a few objects, or the first tar / row group),
    in the calling process: ``(how many decoded, [(item, why not) …])``. A preflight uses it to turn "no image
    decodes" into an error naming one, before any worker starts; a few bad ones are skipped at run time."""
    from mae_service.data.decode import BadImageError, decode_image

    fs, _ = src.filesystem()
    shard = src.shards[0]
    try:
        reader = formats.get(src.fmt).reader(src, fs, shard)
    except Exception as e:  # noqa: BLE001 - tarfile, pyarrow and the readers raise their own types for a bad shard
        raise ValueError(f"data source {src.uri!r}: cannot read {shard.name()}: {type(e).__name__}: {e}") from None
    good, bad = 0, []
    for pos in range(min(n, shard.count)):
        try:
            data, _label = reader.get(pos)
            decode_image(data)
            good += 1
        except BadImageError as e:
            bad.append((reader.name(pos), str(e)))
    return good, bad
