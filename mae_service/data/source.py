"""Dataset sources: list a URI once, in the driver, into shards with known item counts. No Ray.

Formats (``data.format``):

``files``
    Loose images under a prefix. A first folder level gives labels (sorted folder names → 0, 1, ...); images
    directly under the prefix get label -1. Keys are grouped into shards of ``shard_size`` (one read task per
    shard, not per file); the grouping is a fixed pseudo-random interleave of the sorted listing, so every
    shard mixes classes even though the listing is sorted by folder.
``wds``
    Tar shards in the WebDataset layout: members ``key.jpg``/``key.png``/... and optional ``key.cls`` (an
    integer label). One shard per tar; counts come from ``_index.json`` (written by ``mae-service data pack``
    and ``synth``) or, for tars it does not cover, from a pass over the tar headers (a streamed read per tar).
``parquet``
    Parquet files with an image-bytes column (``image``, ``bytes``, ``img``, ``jpg``, ``png``; binary, or a struct
    with a ``bytes`` field as written by Hugging Face datasets) and an optional integer ``label``. One shard per
    row group, counts from the footers.

Global item ids: ``files`` uses the index in the sorted listing; ``wds``/``parquet`` number items in shard order.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from mae_service.data.storage import filesystem_for

logger = logging.getLogger(__name__)

FORMATS = ("files", "wds", "parquet")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
WDS_LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
PARQUET_IMAGE_COLUMNS = ("image", "bytes", "img", "jpg", "jpeg", "png", "image_bytes", "data")
PARQUET_LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")
INDEX_NAME = "_index.json"
_INTERLEAVE_SEED = 0x5EED  # fixed: the files→shards grouping must not depend on the training seed


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
        return (f"Source({self.uri!r}, fmt={self.fmt!r}, num_images={self.num_images}, shards={len(self.shards)}, "
                f"classes={len(self.class_names)})")


# ---- helpers ------------------------------------------------------------------------------------------------
# What to check, appended to S3 errors (listing here, object reads in the pipeline).
HINT_CREDENTIALS = "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or profile)"
HINT_NO_BUCKET = "the bucket does not exist"
HINT_ENDPOINT = "check the S3 endpoint (data.s3_endpoint or AWS_ENDPOINT_URL)"


def source_error(uri: str, what: str) -> ValueError:
    """The error for a data source that cannot be used: names the URI."""
    return ValueError(f"data source {uri!r}: {what}")




def _describe_os_error(e: OSError) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hints = []
    low = msg.lower()
    if "access_denied" in low or "accessdenied" in low or "forbidden" in low or "invalidaccesskeyid" in low \
            or "signature" in low or "403" in low:
        hints.append(HINT_CREDENTIALS)
    if "nosuchbucket" in low or "no_such_bucket" in low or "bucket does not exist" in low:
        hints.append(HINT_NO_BUCKET)
    if "connect" in low or "timeout" in low or "resolve" in low or "network" in low:
        hints.append(HINT_ENDPOINT)
    return msg + (f" ({'; '.join(hints)})" if hints else "")


def _list_files(uri: str, fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Every file under ``root`` (or ``root`` itself if it is a file); ValueError naming ``uri`` on failure."""
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            if isinstance(fs, pafs.S3FileSystem):
                bucket = root.split("/", 1)[0]
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise source_error(uri, f"bucket {bucket!r} does not exist (or is not visible with these credentials)")
            raise source_error(uri, "nothing found at this location")
        if info.type == pafs.FileType.File:
            return [info]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise source_error(uri, f"cannot list: {_describe_os_error(e)}") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


# ---- files --------------------------------------------------------------------------------------------------
def _open_files(uri: str, fs: pafs.FileSystem, root: str, shard_size: int) -> tuple[list[Shard], list[str]]:
    infos = _list_files(uri, fs, root)
    images: list[tuple[str, str]] = []
    other: list[tuple[str, str]] = []
    for i in infos:
        rel = _rel(root, i.path)
        if _hidden(rel):
            continue
        (images if rel.lower().endswith(IMAGE_EXTS) else other).append((rel, i.path))
    if other:
        logger.warning("%s: ignoring %d non-image files (e.g. %s)", uri, len(other), ", ".join(r for r, _ in other[:3]))
    if not images:
        raise source_error(uri, f"no images found (format 'files' looks for {', '.join(IMAGE_EXTS)} files under it)")
    images.sort()
    folders = [rel.split("/", 1)[0] if "/" in rel else None for rel, _ in images]
    class_names = sorted({f for f in folders if f is not None})
    if class_names and None in folders:
        logger.warning("%s: %d images are directly under the prefix (label -1) while others are in class folders",
                       uri, folders.count(None))
    cls_id = {c: k for k, c in enumerate(class_names)}
    labels = np.array([cls_id[f] if f is not None else -1 for f in folders], dtype=np.int64)
    paths = [p for _, p in images]
    n = len(paths)
    order = np.random.default_rng(_INTERLEAVE_SEED).permutation(n)
    shards = []
    for start in range(0, n, shard_size):
        ids = np.sort(order[start:start + shard_size])
        shards.append(Shard(path="", count=len(ids), keys=tuple(paths[i] for i in ids),
                            labels=tuple(int(labels[i]) for i in ids), ids=tuple(int(i) for i in ids)))
    return shards, class_names


# ---- wds ----------------------------------------------------------------------------------------------------
def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: ``dir/key.ext.ext2`` → (``dir/key``, ``ext.ext2``); the extension starts at the first
    dot of the base name."""
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(d, stem), ext.lower()


def iter_wds_samples(tar: tarfile.TarFile, *, read: bool) -> Iterator[tuple[str, bytes | None, int]]:
    """Samples of an open tar, in order: ``(key, image bytes or None when read=False, label or -1)``.

    Consecutive members with the same key form one sample (the WebDataset rule); samples with no image
    member are skipped.
    """
    key: str | None = None
    image: bytes | None = None
    has_image = False
    label = -1
    for m in tar:
        if not m.isfile():
            continue
        k, ext = _split_member(m.name)
        if k != key:
            if key is not None and has_image:
                yield key, image, label
            key, image, has_image, label = k, None, False, -1
        if ext in WDS_IMAGE_EXTS and not has_image:
            has_image = True
            if read:
                f = tar.extractfile(m)
                image = f.read() if f is not None else b""
        elif ext in WDS_LABEL_EXTS:
            f = tar.extractfile(m)
            raw = f.read() if f is not None else b""
            try:
                label = int(raw.decode().strip())
            except (UnicodeDecodeError, ValueError):
                label = -1
    if key is not None and has_image:
        yield key, image, label


def _count_tar(fs: pafs.FileSystem, path: str) -> int:
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        return sum(1 for _ in iter_wds_samples(tar, read=False))


def _read_index(fs: pafs.FileSystem, root: str) -> dict:
    try:
        with fs.open_input_stream(f"{root}/{INDEX_NAME}") as f:
            return json.loads(f.read())
    except (OSError, ValueError, FileNotFoundError):
        return {}


def _open_wds(uri: str, fs: pafs.FileSystem, root: str) -> tuple[list[Shard], list[str]]:
    infos = _list_files(uri, fs, root)
    tars = sorted(i.path for i in infos if i.path.endswith((".tar", ".tar.gz", ".tgz"))
                  and not _hidden(_rel(root, i.path)))
    if not tars:
        raise source_error(uri, "no .tar shards found (format 'wds')")
    single = len(infos) == 1 and infos[0].path == root
    index = {} if single else _read_index(fs, root)
    known = {f"{root}/{name}": int(c) for name, c in (index.get("shards") or {}).items()}
    missing = [t for t in tars if t not in known]
    if missing:
        logger.info("%s: counting samples in %d tar shards not in %s (a pass over the tar headers)",
                    uri, len(missing), INDEX_NAME)
        try:
            with ThreadPoolExecutor(16) as pool:
                for t, c in zip(missing, pool.map(lambda p: _count_tar(fs, p), missing), strict=True):
                    known[t] = c
        except (OSError, tarfile.TarError, EOFError) as e:
            raise source_error(uri, f"cannot read tar shards: {e}") from None
    shards, first = [], 0
    for t in tars:
        if known[t] == 0:
            logger.warning("%s: tar %s holds no images; skipped", uri, t)
            continue
        shards.append(Shard(path=t, count=known[t], first_id=first))
        first += known[t]
    if not shards:
        raise source_error(uri, "no images found in the tar shards")
    return shards, list(index.get("class_names") or [])


# ---- parquet ------------------------------------------------------------------------------------------------
def _image_column(schema) -> str | None:
    import pyarrow as pa

    names = {n.lower(): n for n in schema.names}
    for cand in PARQUET_IMAGE_COLUMNS:
        if cand in names:
            col = names[cand]
            t = schema.field(col).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return col
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                return f"{col}.bytes"
    return None


def _label_column(schema) -> str | None:
    import pyarrow as pa

    names = {n.lower(): n for n in schema.names}
    for cand in PARQUET_LABEL_COLUMNS:
        if cand in names and pa.types.is_integer(schema.field(names[cand]).type):
            return names[cand]
    return None


def _parquet_class_names(metadata: dict | None, label_col: str | None) -> list[str]:
    if not metadata:
        return []
    raw = metadata.get(b"mae_service.class_names")
    if raw:
        return list(json.loads(raw))
    hf = metadata.get(b"huggingface")
    if hf and label_col:
        try:
            feats = json.loads(hf).get("info", {}).get("features", {})
            names = feats.get(label_col, {}).get("names")
            return list(names or [])
        except (ValueError, AttributeError):
            return []
    return []


def _open_parquet(uri: str, fs: pafs.FileSystem, root: str) -> tuple[list[Shard], list[str], str, str | None]:
    import pyarrow.parquet as pq

    infos = _list_files(uri, fs, root)
    files = sorted(i.path for i in infos if i.path.endswith((".parquet", ".pq")) and not _hidden(_rel(root, i.path)))
    if not files:
        raise source_error(uri, "no .parquet files found (format 'parquet')")

    def footer(path: str):
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata

    try:
        with ThreadPoolExecutor(16) as pool:
            metas = list(pool.map(footer, files))
    except (OSError, ValueError) as e:
        raise source_error(uri, f"cannot read Parquet footers: {e}") from None
    schema = metas[0].schema.to_arrow_schema()
    image_col = _image_column(schema)
    if image_col is None:
        raise source_error(uri, f"no image-bytes column in {files[0]!r}: looked for a binary column named one of "
                         f"{', '.join(PARQUET_IMAGE_COLUMNS)}; columns are {', '.join(schema.names)}")
    label_col = _label_column(schema)
    shards, first = [], 0
    for path, meta in zip(files, metas, strict=True):
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                shards.append(Shard(path=path, count=n, first_id=first, row_group=rg))
                first += n
    if not shards:
        raise source_error(uri, "the Parquet files hold no rows")
    return shards, _parquet_class_names(schema.metadata, label_col), image_col, label_col


# ---- entry point --------------------------------------------------------------------------------------------
def open_source(uri: str, fmt: str, *, shard_size: int = 256, s3_endpoint: str | None = None) -> Source:
    """List ``uri`` once (in the calling process) into a :class:`Source` of shards with known counts.

    Raises ``ValueError`` naming the URI for a missing bucket or folder, wrong credentials, an unreachable
    endpoint, no images, or an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"data format {fmt!r}: allowed {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be ≥ 1")
    fs, root = filesystem_for(uri, s3_endpoint)
    root = root.rstrip("/") or root
    image_col = label_col = None
    if fmt == "files":
        shards, class_names = _open_files(uri, fs, root, shard_size)
    elif fmt == "wds":
        shards, class_names = _open_wds(uri, fs, root)
    else:
        shards, class_names, image_col, label_col = _open_parquet(uri, fs, root)
    src = Source(uri=uri, fmt=fmt, shards=shards, class_names=class_names, s3_endpoint=s3_endpoint,
                 image_column=image_col, label_column=label_col)
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
        raise ValueError(f"data source {src.uri!r} has {src.num_images} images: too few for {world_size} ranks × "
                         f"batches of {batch_size}")
    return n
