"""What the format modules share: listing a prefix, errors naming the source, whole-object reads, a reader of
items held in memory, and the writer of sharded formats with their ``_index.json``."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pyarrow.fs as pafs

from mae_service.data.formats import Item, Put
from mae_service.data.source import Shard

INDEX_NAME = "_index.json"
"""Sidecar written next to wds/parquet shards: class names and per-shard sample counts."""

# What to check, appended to S3 errors (listing here, object reads in the decode tasks).
HINT_CREDENTIALS = "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or profile)"
HINT_NO_BUCKET = "the bucket does not exist"
HINT_ENDPOINT = "check the S3 endpoint (data.s3_endpoint or AWS_ENDPOINT_URL)"


def source_error(uri: str, what: str) -> ValueError:
    """The error for a data source that cannot be used: names the URI."""
    return ValueError(f"data source {uri!r}: {what}")


def describe_os_error(e: OSError) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hints = []
    low = msg.lower()
    if (
        "access_denied" in low
        or "accessdenied" in low
        or "forbidden" in low
        or "invalidaccesskeyid" in low
        or "signature" in low
        or "403" in low
    ):
        hints.append(HINT_CREDENTIALS)
    if "nosuchbucket" in low or "no_such_bucket" in low or "bucket does not exist" in low:
        hints.append(HINT_NO_BUCKET)
    if "connect" in low or "timeout" in low or "resolve" in low or "network" in low:
        hints.append(HINT_ENDPOINT)
    return msg + (f" ({'; '.join(hints)})" if hints else "")


def list_files(uri: str, fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Every file under ``root`` (or ``root`` itself if it is a file); ValueError naming ``uri`` on failure."""
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            if isinstance(fs, pafs.S3FileSystem):
                bucket = root.split("/", 1)[0]
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise source_error(
                        uri, f"bucket {bucket!r} does not exist (or is not visible with these credentials)"
                    )
            raise source_error(uri, "nothing found at this location")
        if info.type == pafs.FileType.File:
            return [info]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise source_error(uri, f"cannot list: {describe_os_error(e)}") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def hidden(rel: str) -> bool:
    """A path (relative to the root) with a part starting with ``.`` or ``_``: not data."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def rel(root: str, path: str) -> str:
    """``path`` relative to ``root`` (the base name when ``root`` is the file itself)."""
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def shard_files(uri: str, fs: pafs.FileSystem, root: str, suffixes: tuple[str, ...]) -> tuple[list[str], bool]:
    """The sorted, non-hidden files under ``root`` ending with one of ``suffixes``, and whether ``root`` is itself a
    file."""
    infos = list_files(uri, fs, root)
    paths = sorted(i.path for i in infos if i.path.endswith(suffixes) and not hidden(rel(root, i.path)))
    return paths, len(infos) == 1 and infos[0].path == root


def read_object(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_index(fs: pafs.FileSystem, root: str) -> dict:
    """``root/_index.json``, or ``{}`` when it is missing or unreadable."""
    try:
        with fs.open_input_stream(f"{root}/{INDEX_NAME}") as f:
            return json.loads(f.read())
    except (OSError, ValueError, FileNotFoundError):
        return {}


class MemoryReader:
    """A shard read in one request (a tar, a Parquet row group); items served from memory."""

    def __init__(self, items: list[Item], keys: list[str], shard: Shard):
        if len(items) != shard.count:
            raise RuntimeError(
                f"{shard.name()} now holds {len(items)} images but held {shard.count} when listed; "
                "the data changed under the job (open the source again)"
            )
        self.items, self.keys, self.shard = items, keys, shard

    def name(self, pos: int) -> str:
        return f"{self.shard.name()}:{self.keys[pos]}"

    def get(self, pos: int) -> Item:
        return self.items[pos]

    def iter(self, positions: np.ndarray) -> Iterator[Future[Item]]:
        for p in positions:
            f: Future[Item] = Future()
            f.set_result(self.items[int(p)])
            yield f


Batch = list[tuple[str, bytes, str, int]]
"""``[(key, bytes, ext, label)]``: the items of one shard, for a format's ``write_shard``."""


class ShardWriter:
    """Items in shards of ``shard_size``, shard ``k`` written as ``pattern.format(k)`` with ``encode(batch,
    class_names, shard_size)``; ``close`` writes the last shard and ``_index.json`` (format, class names, image
    count, per-shard counts), which lets ``open_dataset`` list the shards without reading them."""

    def __init__(
        self,
        put: Put,
        fmt: str,
        pattern: str,
        encode: Callable[[Batch, list[str], int], bytes],
        class_names: list[str],
        shard_size: int,
    ):
        self.put, self.fmt, self.pattern, self.encode = put, fmt, pattern, encode
        self.class_names, self.shard_size = class_names, shard_size
        self.batch: Batch = []
        self.counts: dict[str, int] = {}
        self.n = 0

    def add(self, key: str, data: bytes, ext: str, label: int) -> None:
        self.batch.append((key, data, ext, label))
        self.n += 1
        if len(self.batch) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        name = self.pattern.format(len(self.counts))
        self.put(name, self.encode(self.batch, self.class_names, self.shard_size))
        self.counts[name] = len(self.batch)
        self.batch = []

    def close(self) -> None:
        self._flush()
        index = {"format": self.fmt, "class_names": self.class_names, "num_images": self.n, "shards": self.counts}
        self.put(INDEX_NAME, json.dumps(index, indent=1).encode())
