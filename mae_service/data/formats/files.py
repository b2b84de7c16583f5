"""Format ``files``: loose images under a prefix.

A first folder level gives labels (sorted folder names → 0, 1, ...); images directly under the prefix get label
-1. Keys are grouped into shards of ``shard_size`` (one read task per shard, not per file); the grouping is a fixed
pseudo-random interleave of the sorted listing, so every shard mixes classes even though the listing is sorted by
folder. Item ids are indices in the sorted listing.

Listing: the first folder level is listed in parallel, one class folder per thread (on S3, one paginated LIST per
class prefix instead of one sequential LIST of everything), and kept in compact arrays (Arrow strings, numpy), as
are the shards' keys (:class:`~mae_service.data.source.FileItems`). A root holding ``_mae_manifest.parquet``
(``mae-service data index URI``) is not listed: the manifest gives the keys, labels and sizes, after a check of a
sample of its keys against storage.

In a decode task a shard's objects are fetched concurrently on a thread pool (on S3 one GET per object, see
:class:`_S3Objects`) and handed out in the order asked. Written as ``<class>/<key>.<ext>`` (``<key>.<ext>`` for
label -1).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mae_service.data.decode import BadImageError
from mae_service.data.formats import Item, Listing, Put
from mae_service.data.formats.shared import (
    HINT_CREDENTIALS,
    HINT_ENDPOINT,
    HINT_NO_BUCKET,
    describe_os_error,
    hidden,
    list_files,
    read_object,
    rel,
    source_error,
)
from mae_service.data.source import FileItems, Shard, Source
from mae_service.data.storage import S3_MAX_ATTEMPTS, filesystem_for, is_s3, s3_client, unreachable

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FETCH_THREADS = 16
LIST_THREADS = 16
"""Class folders listed at once."""
_INTERLEAVE_SEED = 0x5EED  # fixed: the files→shards grouping must not depend on the training seed


# ---- listing ------------------------------------------------------------------------------------------------
@dataclass
class Found:
    """A sorted listing of loose images, in compact arrays: keys relative to the root, their labels and sizes."""

    keys: pa.LargeStringArray
    labels: np.ndarray
    sizes: np.ndarray
    class_names: list[str]
    prefix: str
    """What the keys are relative to: the root and ``/`` (empty when the root is itself one image)."""


def _images_under(uri: str, fs: pafs.FileSystem, root: str, path: str) -> tuple[list[str], list[int], list[str]]:
    """The images (relative keys, sizes) and the other files (relative keys) under ``path``, recursively."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise source_error(uri, f"cannot list {path}: {describe_os_error(e)}") from None
    keys, sizes, other = [], [], []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        r = rel(root, i.path)
        if hidden(r):
            continue
        if r.lower().endswith(IMAGE_EXTS):
            keys.append(r)
            sizes.append(i.size or 0)
        else:
            other.append(r)
    return keys, sizes, other


def list_images(uri: str, fs: pafs.FileSystem, root: str, *, manifest: bool = True) -> Found:
    """List the images under ``root``: from its manifest when there is one (and ``manifest``), else the first
    folder level in parallel (``LIST_THREADS`` at once; on S3 one paginated LIST per class folder instead of one for
    everything), each folder's result turned into compact arrays as it arrives. ValueError naming ``uri`` when
    nothing is there or it cannot be listed."""
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            list_files(uri, fs, root)  # raises the error saying what is missing (bucket or prefix)
        if info.type == pafs.FileType.File:
            if not root.lower().endswith(IMAGE_EXTS):
                raise source_error(uri, f"not an image (format 'files' reads {', '.join(IMAGE_EXTS)} files)")
            keys = pa.array([root], pa.large_string())
            return Found(keys, np.full(1, -1, np.int64), np.array([info.size or 0], np.int64), [], "")
        top = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except OSError as e:
        raise source_error(uri, f"cannot list: {describe_os_error(e)}") from None
    if manifest and any(i.type == pafs.FileType.File and i.base_name == MANIFEST_NAME for i in top):
        return read_manifest(uri, fs, root)
    folders = sorted(i.path for i in top if i.type == pafs.FileType.Directory and not hidden(rel(root, i.path)))
    loose = [i for i in top if i.type == pafs.FileType.File and not hidden(rel(root, i.path))]
    parts: list[tuple[str | None, list[str], list[int], list[str]]] = [
        (
            None,
            [rel(root, i.path) for i in loose if i.path.lower().endswith(IMAGE_EXTS)],
            [i.size or 0 for i in loose if i.path.lower().endswith(IMAGE_EXTS)],
            [rel(root, i.path) for i in loose if not i.path.lower().endswith(IMAGE_EXTS)],
        )
    ]
    if folders:
        with ThreadPoolExecutor(min(LIST_THREADS, len(folders)), thread_name_prefix="mae-list") as pool:
            for folder, (keys, sizes, other) in zip(
                folders, pool.map(lambda f: _images_under(uri, fs, root, f), folders), strict=True
            ):
                parts.append((rel(root, folder), keys, sizes, other))
    other = [r for *_, o in parts for r in o]
    if other:
        logger.warning("%s: ignoring %d non-image files (e.g. %s)", uri, len(other), ", ".join(other[:3]))
    class_names = sorted(f for f, keys, _, _ in parts if f is not None and keys)
    cls_id = {c: k for k, c in enumerate(class_names)}
    n_loose = len(parts[0][1])
    if class_names and n_loose:
        logger.warning(
            "%s: %d images are directly under the prefix (label -1) while others are in class folders", uri, n_loose
        )
    chunks = pa.chunked_array([pa.array(k, pa.large_string()) for _, k, _, _ in parts], pa.large_string())
    # a folder holding no images is no class (its label would never be used: it has no items)
    labels = np.concatenate(
        [np.full(len(k), cls_id.get(f, -1) if f is not None else -1, np.int64) for f, k, _, _ in parts]
    )
    byte_sizes = np.concatenate([np.asarray(z, np.int64) for _, _, z, _ in parts])
    del parts
    if len(chunks) == 0:
        raise source_error(uri, f"no images found (format 'files' looks for {', '.join(IMAGE_EXTS)} files under it)")
    order = pc.array_sort_indices(chunks).to_numpy()
    return Found(chunks.take(order).combine_chunks(), labels[order], byte_sizes[order], class_names, f"{root}/")


def shards_of(found: Found, shard_size: int) -> list[Shard]:
    """Group a sorted listing into shards of ``shard_size``: a fixed pseudo-random interleave (every shard mixes
    classes), sorted within each shard; item ids are indices in the sorted listing."""
    n = len(found.keys)
    order = np.random.default_rng(_INTERLEAVE_SEED).permutation(n)
    full = n // shard_size * shard_size
    perm = np.concatenate([np.sort(order[:full].reshape(-1, shard_size), axis=1).ravel(), np.sort(order[full:])])
    taken = found.keys.take(pa.array(perm))
    buffers = taken.buffers()
    offsets = np.frombuffer(buffers[1], np.int64)[taken.offset : taken.offset + n + 1]
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    labels = found.labels[perm].astype(np.int32)
    shards = []
    for start in range(0, n, shard_size):
        stop = min(start + shard_size, n)
        o = offsets[start : stop + 1]
        blob = data[o[0] : o[-1]].tobytes()
        files = FileItems(found.prefix, blob, (o - o[0]).astype(np.int32), labels[start:stop], perm[start:stop].copy())
        shards.append(Shard(path="", count=stop - start, files=files))
    return shards


def open_dataset(uri: str, fs: pafs.FileSystem, root: str, *, shard_size: int) -> Listing:
    found = list_images(uri, fs, root)
    return Listing(shards_of(found, shard_size), found.class_names)


# ---- manifest -----------------------------------------------------------------------------------------------
MANIFEST_NAME = "_mae_manifest.parquet"
"""Written by ``mae-service data index URI`` at the dataset's root: every image's key (relative to the root),
label and size, sorted by key, and the class names in the file's metadata. Hidden from the listing by its ``_``."""
MANIFEST_SAMPLE = 32
"""Keys a manifest's user checks against storage (a stat / HEAD each, in parallel) before trusting it."""
_MANIFEST_META = b"mae_service.manifest"


def write_manifest(uri: str, s3_endpoint: str | None = None) -> tuple[int, str]:
    """List ``uri`` (format ``files``) and write its manifest at ``uri/_mae_manifest.parquet``; returns the image
    count and the manifest's URI."""
    fs, root = filesystem_for(uri, s3_endpoint)
    root = root.rstrip("/") or root
    found = list_images(uri, fs, root, manifest=False)
    meta = {"version": 1, "class_names": found.class_names, "num_images": len(found.keys)}
    table = pa.table(
        {"key": found.keys, "label": pa.array(found.labels, pa.int32()), "size": pa.array(found.sizes, pa.int64())}
    ).replace_schema_metadata({_MANIFEST_META: json.dumps(meta).encode()})
    path = f"{root}/{MANIFEST_NAME}"
    try:
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out, compression="zstd")
    except OSError as e:
        raise source_error(uri, f"cannot write {MANIFEST_NAME}: {describe_os_error(e)}") from None
    return len(found.keys), f"{uri.rstrip('/')}/{MANIFEST_NAME}"


def read_manifest(uri: str, fs: pafs.FileSystem, root: str) -> Found:
    """The listing from ``root/_mae_manifest.parquet``. A sample of
    :data:`MANIFEST_SAMPLE` keys is checked against storage first: a key missing or of another size means the
    manifest is stale, a ValueError telling the user to run ``mae-service data index`` again."""
    path = f"{root}/{MANIFEST_NAME}"
    again = f"run `mae-service data index {uri}` again (or delete {MANIFEST_NAME} to list the files instead)"
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        meta = json.loads((table.schema.metadata or {})[_MANIFEST_META])
        keys = table.column("key").combine_chunks().cast(pa.large_string())
        labels = table.column("label").to_numpy().astype(np.int64)
        sizes = table.column("size").to_numpy().astype(np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise source_error(uri, f"unreadable {MANIFEST_NAME} ({type(e).__name__}: {e}); {again}") from None
    n = len(keys)
    if n == 0 or meta.get("num_images") != n:
        raise source_error(uri, f"{MANIFEST_NAME} holds {n} keys but says {meta.get('num_images')}; {again}")
    sample = np.random.default_rng().choice(n, min(n, MANIFEST_SAMPLE), replace=False)

    def changed(i: int) -> str | None:
        key = keys[int(i)].as_py()
        try:
            got = fs.get_file_info(f"{root}/{key}")
        except OSError as e:
            return f"{key!r}: {describe_os_error(e)}"
        if got.type != pafs.FileType.File:
            return f"{key!r} is missing"
        if got.size != sizes[int(i)]:
            return f"{key!r} is {got.size} bytes, not {sizes[int(i)]}"
        return None

    with ThreadPoolExecutor(min(LIST_THREADS, len(sample)), thread_name_prefix="mae-manifest") as pool:
        stale = [c for c in pool.map(changed, sample) if c]
    if stale:
        raise source_error(
            uri,
            f"its {MANIFEST_NAME} is stale: {len(stale)} of {len(sample)} sampled keys differ from storage "
            f"(e.g. {stale[0]}); {again}",
        )
    logger.info(
        "%s: using %s (%d images, %d classes; files added after `data index` are not seen)",
        uri,
        MANIFEST_NAME,
        n,
        len(meta.get("class_names", [])),
    )
    return Found(keys, labels, sizes, list(meta.get("class_names", [])), f"{root}/")


# ---- reading ------------------------------------------------------------------------------------------------
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _fetch_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="mae-fetch")
        return _pool


_client_lock = threading.Lock()
_clients: dict[tuple[str, str | None], object] = {}

# S3 error codes that no other object of the source would escape: fail the task instead of skipping every image.
_S3_CREDENTIAL_ERRORS = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "InvalidSecurity",
}


class _S3Objects:
    """Whole S3 objects, one GET each. pyarrow's ``open_input_stream`` sends a HEAD and then a GET per object,
    twice the requests (and, against a slow server, half the objects per second) for loose image files.

    ``read`` raises OSError for an object that cannot be read (missing, or a server error after the retries): a
    bad item, like a corrupt one. Wrong credentials, a missing bucket, an unreachable endpoint or a store that
    stops answering (timeouts on every attempt) raise ValueError naming the source URI, since every other object
    would fail the same way: skipping it would only move on to the next hung read, and change the data."""

    def __init__(self, uri: str, s3_endpoint: str | None):
        self.uri = uri
        bucket = urlparse(uri).netloc
        with _client_lock:  # one client per process and source bucket (boto3 clients are thread-safe)
            key = (bucket, s3_endpoint)
            if key not in _clients:
                _clients[key] = s3_client(bucket, s3_endpoint, max_pool_connections=FETCH_THREADS)
            self.client = _clients[key]

    def _fail(self, path: str, what: str) -> ValueError:
        return source_error(self.uri, f"cannot read s3://{path}: {what}")

    def read(self, path: str) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        bucket, key = path.split("/", 1)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = f"{code or status}: {err.get('Message', '')}".rstrip(": ")
            if code == "NoSuchBucket":
                raise self._fail(path, f"{msg} ({HINT_NO_BUCKET})") from None
            if code in _S3_CREDENTIAL_ERRORS or status == 403:
                raise self._fail(path, f"{msg} ({HINT_CREDENTIALS})") from None
            raise OSError(msg) from None  # NoSuchKey (the object vanished since listing), 5xx after retries
        except NoCredentialsError as e:
            raise self._fail(path, f"{e} ({HINT_CREDENTIALS})") from None
        except EndpointConnectionError as e:
            raise self._fail(path, f"{e} ({HINT_ENDPOINT})") from None
        except (ReadTimeoutError, ConnectTimeoutError, ConnectionClosedError) as e:  # a hung or dropped store
            raise self._fail(path, f"{e}, {S3_MAX_ATTEMPTS} attempts ({HINT_ENDPOINT})") from None
        except BotoCoreError as e:  # truncated bodies, ...
            raise OSError(str(e)) from None


class _FilesReader:
    """Loose files: each item is an object; fetched concurrently, returned in the order asked."""

    def __init__(self, fs: pafs.FileSystem, shard: Shard, s3: _S3Objects | None = None, uri: str = ""):
        self.fs, self.shard, self.s3, self.uri = fs, shard, s3, uri

    def name(self, pos: int) -> str:
        return self.shard.key(pos)

    def get(self, pos: int) -> Item:
        path = self.shard.key(pos)
        try:
            data = self.s3.read(path) if self.s3 is not None else read_object(self.fs, path)
        except OSError as e:  # vanished or unreadable object: a bad item, like a corrupt one
            if self.s3 is None and (why := unreachable(e)):  # the store, not the object: see _S3Objects
                raise source_error(self.uri or path, f"cannot read {path}: {why}") from None
            raise BadImageError(f"cannot read: {e}") from None
        return data, self.shard.label(pos)

    def iter(self, positions: np.ndarray) -> Iterator[Future[Item]]:
        pool = _fetch_pool()
        window = FETCH_THREADS * 2  # bounded read-ahead
        futures: list[Future[Item] | None] = [pool.submit(self.get, int(p)) for p in positions[:window]]
        for k in range(len(positions)):
            if k + window < len(positions):
                futures.append(pool.submit(self.get, int(positions[k + window])))
            fut = futures[k]
            futures[k] = None  # free the bytes
            assert fut is not None
            yield fut


def reader(src: Source, fs: pafs.FileSystem, shard: Shard) -> _FilesReader:
    return _FilesReader(fs, shard, _S3Objects(src.uri, src.s3_endpoint) if is_s3(src.uri) else None, src.uri)


# ---- writing ------------------------------------------------------------------------------------------------
class _FilesWriter:
    def __init__(self, put: Put, class_names: list[str]):
        self.put, self.class_names = put, class_names

    def add(self, key: str, data: bytes, ext: str, label: int) -> None:
        folder = f"{self.class_names[label]}/" if label >= 0 and self.class_names else ""
        self.put(f"{folder}{key}.{ext}", data)

    def close(self) -> None:
        pass


def writer(put: Put, class_names: list[str], *, shard_size: int) -> _FilesWriter:
    """``<class>/<key>.<ext>`` per item (``<key>.<ext>`` for label -1); ``shard_size`` does not apply."""
    return _FilesWriter(put, class_names)
