"""Format ``parquet``: Parquet files with an image-bytes column and an optional integer label.

The image column is the first of ``image``, ``bytes``, ``img``, ``jpg``, ... (:data:`IMAGE_COLUMNS`) that is binary,
or a struct with a ``bytes`` field as written by Hugging Face datasets; the label column the first integer one of
:data:`LABEL_COLUMNS`. One shard per row group, counts from the footers; item ids number the items in shard order.
Class names come from the schema metadata (``mae_service.class_names``, or a Hugging Face ``ClassLabel``). A decode
task reads a whole row group in one request. Written as ``part-NNNNN.parquet`` (one row group each) plus
``_index.json``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mae_service.data.formats import Listing, Put
from mae_service.data.formats.shared import Batch, MemoryReader, ShardWriter, shard_files, source_error
from mae_service.data.source import Shard, Source

IMAGE_COLUMNS = ("image", "bytes", "img", "jpg", "jpeg", "png", "image_bytes", "data")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")
CLASS_NAMES_KEY = b"mae_service.class_names"


def _image_column(schema: pa.Schema) -> str | None:
    names = {n.lower(): n for n in schema.names}
    for cand in IMAGE_COLUMNS:
        if cand in names:
            col = names[cand]
            t = schema.field(col).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return col
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                return f"{col}.bytes"
    return None


def _label_column(schema: pa.Schema) -> str | None:
    names = {n.lower(): n for n in schema.names}
    for cand in LABEL_COLUMNS:
        if cand in names and pa.types.is_integer(schema.field(names[cand]).type):
            return names[cand]
    return None


def _class_names(metadata: dict | None, label_col: str | None) -> list[str]:
    if not metadata:
        return []
    raw = metadata.get(CLASS_NAMES_KEY)
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


def open_dataset(uri: str, fs: pafs.FileSystem, root: str, *, shard_size: int) -> Listing:
    """One shard per row group (``shard_size`` does not apply)."""
    files, _ = shard_files(uri, fs, root, (".parquet", ".pq"))
    if not files:
        raise source_error(uri, "no .parquet files found (format 'parquet')")

    def footer(path: str) -> pq.FileMetaData:
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
        raise source_error(
            uri,
            f"no image-bytes column in {files[0]!r}: looked for a binary column named one of "
            f"{', '.join(IMAGE_COLUMNS)}; columns are {', '.join(schema.names)}",
        )
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
    return Listing(shards, _class_names(schema.metadata, label_col), image_col, label_col)


def reader(src: Source, fs: pafs.FileSystem, shard: Shard) -> MemoryReader:
    image_column, label_column = src.image_column, src.label_column
    assert image_column is not None, "a parquet Source names its image column"
    top = image_column.split(".", 1)[0]
    cols = [top] + ([label_column] if label_column else [])
    with fs.open_input_file(shard.path) as f:
        table = pq.ParquetFile(f).read_row_group(shard.row_group, columns=cols)
    col = table.column(top)
    if "." in image_column:
        col = col.combine_chunks().field("bytes")
    images = [b if b is not None else b"" for b in col.to_pylist()]
    labels = table.column(label_column).to_pylist() if label_column else [-1] * len(images)
    items = [(img, int(lab) if lab is not None else -1) for img, lab in zip(images, labels, strict=True)]
    return MemoryReader(items, [f"row{i}" for i in range(len(items))], shard)


def write_shard(items: Batch, class_names: list[str], shard_size: int) -> bytes:
    """``[(key, bytes, ext, label)]`` → Parquet bytes with columns key, image (binary), label (int64), row groups of
    ``shard_size`` rows and the class names in the schema metadata."""
    table = pa.table(
        {
            "key": pa.array([k for k, _, _, _ in items], pa.string()),
            "image": pa.array([b for _, b, _, _ in items], pa.binary()),
            "label": pa.array([lab for _, _, _, lab in items], pa.int64()),
        }
    ).replace_schema_metadata({CLASS_NAMES_KEY.decode(): json.dumps(class_names)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, shard_size), compression="none")
    return sink.getvalue().to_pybytes()


def writer(put: Put, class_names: list[str], *, shard_size: int) -> ShardWriter:
    return ShardWriter(put, "parquet", "part-{:05d}.parquet", write_shard, class_names, shard_size)
