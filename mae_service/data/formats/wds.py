"""Format ``wds``: tar shards in the WebDataset layout.

Members ``key.jpg``/``key.png``/... and optional ``key.cls`` (an integer label). One shard per tar; counts come from
``_index.json`` (written by ``mae-service data pack`` and ``synth``) or, for tars it does not cover, from a pass
over the tar headers (a streamed read per tar). Item ids number the items in shard order. A decode task reads a
whole tar in one request. Written as ``shard-NNNNN.tar`` (uncompressed) plus ``_index.json``.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from mae_service.data.formats import Listing, Put
from mae_service.data.formats.shared import (
    INDEX_NAME,
    Batch,
    MemoryReader,
    ShardWriter,
    hidden,
    list_files,
    read_index,
    read_object,
    rel,
    source_error,
)
from mae_service.data.source import Shard, Source

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: ``dir/key.ext.ext2`` → (``dir/key``, ``ext.ext2``); the extension starts at the first
    dot of the base name."""
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(d, stem), ext.lower()


def iter_samples(tar: tarfile.TarFile, *, read: bool) -> Iterator[tuple[str, bytes | None, int]]:
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
        if ext in IMAGE_EXTS and not has_image:
            has_image = True
            if read:
                f = tar.extractfile(m)
                image = f.read() if f is not None else b""
        elif ext in LABEL_EXTS:
            f = tar.extractfile(m)
            raw = f.read() if f is not None else b""
            try:
                label = int(raw.decode().strip())
            except (UnicodeDecodeError, ValueError):
                label = -1
    if key is not None and has_image:
        yield key, image, label


def _count_tar(fs: pafs.FileSystem, path: str) -> int:
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            return sum(1 for _ in iter_samples(tar, read=False))
    except (tarfile.TarError, EOFError) as e:
        raise tarfile.TarError(f"tar shard {path} is damaged or truncated ({e})") from None


def open_dataset(uri: str, fs: pafs.FileSystem, root: str, *, shard_size: int) -> Listing:
    """One shard per tar (``shard_size`` does not apply)."""
    infos = list_files(uri, fs, root)
    single = len(infos) == 1 and infos[0].path == root
    sizes = {i.path: i.size for i in infos}
    tars = sorted(p for p in sizes if p.endswith(TAR_SUFFIXES) and not hidden(rel(root, p)))
    if not tars:
        raise source_error(uri, "no .tar shards found (format 'wds')")
    # an uncompressed tar is whole 512-byte blocks ending in two zero blocks: a shorter or ragged one was cut
    # short (an interrupted upload), which the listing shows without reading it (the counts may come from
    # _index.json, so nothing else would open it before a worker does)
    cut = [t for t in tars if t.endswith(".tar") and sizes[t] is not None and (sizes[t] % 512 or sizes[t] < 1024)]
    if cut:
        raise source_error(
            uri,
            f"tar shard {cut[0]} is truncated ({sizes[cut[0]]} bytes, not a whole number of 512-byte tar blocks)"
            + (f" and {len(cut) - 1} more" if len(cut) > 1 else "")
            + "; write it again (mae-service data pack) or remove it",
        )
    index = {} if single else read_index(fs, root)
    known = {f"{root}/{name}": int(c) for name, c in (index.get("shards") or {}).items()}
    missing = [t for t in tars if t not in known]
    if missing:
        logger.info(
            "%s: counting samples in %d tar shards not in %s (a pass over the tar headers)",
            uri,
            len(missing),
            INDEX_NAME,
        )
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
    return Listing(shards, list(index.get("class_names") or []))


def reader(src: Source, fs: pafs.FileSystem, shard: Shard) -> MemoryReader:
    data = read_object(fs, shard.path)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        samples = list(iter_samples(tar, read=True))
    return MemoryReader([(img or b"", label) for _, img, label in samples], [k for k, _, _ in samples], shard)


def write_shard(items: Batch, class_names: list[str], shard_size: int) -> bytes:
    """``[(key, bytes, ext, label)]`` → an uncompressed tar in the WebDataset layout (key.ext + key.cls)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, ext, label in items:
            members = [(f"{key}.{ext}", data)]
            if label >= 0:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def writer(put: Put, class_names: list[str], *, shard_size: int) -> ShardWriter:
    return ShardWriter(put, "wds", "shard-{:05d}.tar", write_shard, class_names, shard_size)
