"""The data formats: the one registry of them. Each format is one module of this package, named after it.

A format module (``formats/<name>.py``, see :class:`FormatModule`) defines three functions:

``open_dataset(uri, fs, root, *, shard_size) -> Listing``
    List a dataset of this format (in the driver) into shards with known item counts, and its class names.
``reader(src, fs, shard) -> Reader``
    Read one shard in a decode task: the items' bytes and labels, by position in the shard.
``writer(put, class_names, *, shard_size) -> ItemWriter``
    Write ``(key, bytes, ext, label)`` items in this format through ``put(relative path, bytes)``
    (``data synth``; ``data pack`` for formats with ``pack_target``).

Adding a format: write ``formats/<name>.py`` with those functions, add a :class:`Format` line to :data:`_FORMATS`
below, and test it (``tests/unit/test_data_formats.py`` runs every registered format through synth, open and read).

Importing this module is cheap and imports nothing outside the standard library (``config`` validates
``data.format`` against :data:`NAMES`); :meth:`Format.module` imports a format's module on first use, and those
import numpy, pyarrow and PIL at most.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow.fs as pafs

    from mae_service.data.source import Shard, Source

Item = tuple[bytes, int]
"""An item as a reader returns it: the encoded image and its label (-1: none)."""
Put = Callable[[str, bytes], None]
"""Writes one object at a path relative to the output root."""


@dataclass
class Listing:
    """What ``open_dataset`` found: the shards in order, the class names (label ``k`` is ``class_names[k]``), and
    for formats with columns (``parquet``) the image column and the label column."""

    shards: list[Shard]
    class_names: list[str] = field(default_factory=list)
    image_column: str | None = None
    label_column: str | None = None


class Reader(Protocol):
    """One shard's items, by position ``0 .. shard.count-1``. ``get`` and the futures of ``iter`` raise
    :class:`~mae_service.data.decode.BadImageError` for an object that cannot be read."""

    def name(self, pos: int) -> str:
        """The item, as named in log messages."""
        ...

    def get(self, pos: int) -> Item: ...

    def iter(self, positions: np.ndarray) -> Iterator[Future[Item]]:
        """The items at ``positions``, in that order (fetched ahead where that helps)."""
        ...


class ItemWriter(Protocol):
    """Writes items one by one; ``close`` writes what is left (the last shard, an index)."""

    def add(self, key: str, data: bytes, ext: str, label: int) -> None: ...

    def close(self) -> None: ...


class FormatModule(Protocol):
    """What ``formats/<name>.py`` defines."""

    def open_dataset(self, uri: str, fs: pafs.FileSystem, root: str, *, shard_size: int) -> Listing: ...

    def reader(self, src: Source, fs: pafs.FileSystem, shard: Shard) -> Reader: ...

    def writer(self, put: Put, class_names: list[str], *, shard_size: int) -> ItemWriter: ...


@dataclass(frozen=True)
class Format:
    """One registered format; its functions live in ``mae_service.data.formats.<name>``."""

    name: str
    summary: str
    """One line for help texts."""
    pack_target: bool = True
    """``data pack`` (a ``files`` folder → this format) can write it."""

    def module(self) -> FormatModule:
        return cast("FormatModule", importlib.import_module(f"{__name__}.{self.name}"))

    def open_dataset(self, uri: str, fs: pafs.FileSystem, root: str, *, shard_size: int) -> Listing:
        return self.module().open_dataset(uri, fs, root, shard_size=shard_size)

    def reader(self, src: Source, fs: pafs.FileSystem, shard: Shard) -> Reader:
        return self.module().reader(src, fs, shard)

    def writer(self, put: Put, class_names: list[str], *, shard_size: int) -> ItemWriter:
        return self.module().writer(put, class_names, shard_size=shard_size)


_FORMATS = (
    Format("files", "loose images under a prefix; first-level folders are the classes", pack_target=False),
    Format("wds", "WebDataset tar shards (key.jpg + key.cls), counts from _index.json"),
    Format("parquet", "Parquet files with an image-bytes column and an optional integer label column"),
)
_BY_NAME = {f.name: f for f in _FORMATS}

NAMES: tuple[str, ...] = tuple(f.name for f in _FORMATS)
"""Every format name, in the order shown to users."""
PACK_TARGETS: tuple[str, ...] = tuple(f.name for f in _FORMATS if f.pack_target)
"""The formats ``data pack`` can write."""
FOLDER = "files"
"""A plain folder of images, one object each: the default format (``data synth``) and what ``data pack`` reads."""


def get(name: str, *, pack_target: bool = False, what: str | None = None) -> Format:
    """The format called ``name`` (one of :data:`PACK_TARGETS` if ``pack_target``).

    Raises ``ValueError("<what>: allowed <names>")``; ``what`` names the bad value (default ``data format 'x'``).
    """
    allowed = PACK_TARGETS if pack_target else NAMES
    if name not in allowed:
        raise ValueError(f"{what or f'data format {name!r}'}: allowed {', '.join(allowed)}")
    return _BY_NAME[name]
