"""Format ``files``: loose images under a prefix.

A first folder level gives labels (sorted folder names → 0, 1, ...); images directly under the prefix get label
-1. Keys are grouped into shards of ``shard_size`` (one read task per shard, not per file); the grouping is a fixed
pseudo-random interleave of the sorted listing, so every shard mixes classes even though the listing is sorted by
folder. Item ids are indices in the sorted listing.

In a decode task a shard's objects are fetched concurrently on a thread pool (on S3 one GET per object, see
:class:`_S3Objects`) and handed out in the order asked. Written as ``<class>/<key>.<ext>`` (``<key>.<ext>`` for
label -1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs

from mae_service.data.decode import BadImageError
from mae_service.data.formats import Item, Listing, Put
from mae_service.data.formats.shared import (
    HINT_CREDENTIALS,
    HINT_ENDPOINT,
    HINT_NO_BUCKET,
    hidden,
    list_files,
    read_object,
    rel,
    source_error,
)
from mae_service.data.source import Shard, Source
from mae_service.data.storage import is_s3, s3_client

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FETCH_THREADS = 16
_INTERLEAVE_SEED = 0x5EED  # fixed: the files→shards grouping must not depend on the training seed


# ---- listing ------------------------------------------------------------------------------------------------
def open_dataset(uri: str, fs: pafs.FileSystem, root: str, *, shard_size: int) -> Listing:
    images: list[tuple[str, str]] = []
    other: list[tuple[str, str]] = []
    for i in list_files(uri, fs, root):
        r = rel(root, i.path)
        if hidden(r):
            continue
        (images if r.lower().endswith(IMAGE_EXTS) else other).append((r, i.path))
    if other:
        logger.warning("%s: ignoring %d non-image files (e.g. %s)", uri, len(other), ", ".join(r for r, _ in other[:3]))
    if not images:
        raise source_error(uri, f"no images found (format 'files' looks for {', '.join(IMAGE_EXTS)} files under it)")
    images.sort()
    folders = [r.split("/", 1)[0] if "/" in r else None for r, _ in images]
    class_names = sorted({f for f in folders if f is not None})
    if class_names and None in folders:
        logger.warning(
            "%s: %d images are directly under the prefix (label -1) while others are in class folders",
            uri,
            folders.count(None),
        )
    cls_id = {c: k for k, c in enumerate(class_names)}
    labels = np.array([cls_id[f] if f is not None else -1 for f in folders], dtype=np.int64)
    paths = [p for _, p in images]
    n = len(paths)
    order = np.random.default_rng(_INTERLEAVE_SEED).permutation(n)
    shards = []
    for start in range(0, n, shard_size):
        ids = np.sort(order[start : start + shard_size])
        shards.append(
            Shard(
                path="",
                count=len(ids),
                keys=tuple(paths[i] for i in ids),
                labels=tuple(int(labels[i]) for i in ids),
                ids=tuple(int(i) for i in ids),
            )
        )
    return Listing(shards, class_names)


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

    ``read`` raises OSError for an object that cannot be read (missing, or failing after the retries): a bad item,
    like a corrupt one. Wrong credentials, a missing bucket or an unreachable endpoint raise ValueError naming the
    source URI, since every other object would fail the same way."""

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
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

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
        except BotoCoreError as e:  # read timeouts, truncated bodies, ...
            raise OSError(str(e)) from None


class _FilesReader:
    """Loose files: each item is an object; fetched concurrently, returned in the order asked."""

    def __init__(self, fs: pafs.FileSystem, shard: Shard, s3: _S3Objects | None = None):
        self.fs, self.shard, self.s3 = fs, shard, s3

    def name(self, pos: int) -> str:
        return self.shard.keys[pos]

    def get(self, pos: int) -> Item:
        path = self.shard.keys[pos]
        try:
            data = self.s3.read(path) if self.s3 is not None else read_object(self.fs, path)
        except OSError as e:  # vanished or unreadable object: a bad item, like a corrupt one
            raise BadImageError(f"cannot read: {e}") from None
        return data, self.shard.labels[pos]

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
    return _FilesReader(fs, shard, _S3Objects(src.uri, src.s3_endpoint) if is_s3(src.uri) else None)


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
