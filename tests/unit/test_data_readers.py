"""The decode tasks' logic run in-process (no Ray): Parquet with a Hugging Face-style struct column, wds, files;
bad objects replaced within the shard; eval order."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mae_service.data import formats, open_source
from mae_service.data import pipeline as P
from mae_service.data.synth import synthesize
from tests.unit.test_decode import bad_objects


def run(src, *, train: bool, epochs: int = 1, world: int = 1, batch: int = 1) -> dict[str, np.ndarray]:
    """What the Ray Data tasks would produce for rank 0, computed in this process."""
    if train:
        per = P.samples_per_rank(src, world, batch)
        units = P.plan_rank(
            np.array([s.count for s in src.shards]), seed=0, rank=0, world_size=world, per_rank=per, epochs=epochs
        )
    else:
        units = np.array([(0, i, 0, s.count) for i, s in enumerate(src.shards)], np.int64)
    job = P._job(src, units, seed=0, image_size=16, train=train)
    out = [b for u in range(len(units)) for b in P._run_units({"id": np.array([u])}, job)]
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "PNG")
    return buf.getvalue()


def test_parquet_struct_image_column_and_class_names(tmp_path):
    images = [{"bytes": png((i * 20, 0, 0)), "path": f"{i}.png"} for i in range(6)]
    table = pa.table({"image": images, "label": pa.array([0, 1, 2, 0, 1, 2], pa.int64())})
    hf = {"info": {"features": {"label": {"names": ["a", "b", "c"], "_type": "ClassLabel"}}}}
    pq.write_table(
        table.replace_schema_metadata({"huggingface": json.dumps(hf)}), tmp_path / "x.parquet", row_group_size=4
    )
    src = open_source(str(tmp_path), "parquet")
    assert src.image_column == "image.bytes" and src.label_column == "label" and src.class_names == ["a", "b", "c"]
    assert [s.count for s in src.shards] == [4, 2]
    ev = run(src, train=False)
    assert ev["label"].tolist() == [0, 1, 2, 0, 1, 2]
    assert ev["image"][:, 0, 8, 8].tolist() == [0, 20, 40, 60, 80, 100]  # red channel, in row order


def test_parquet_without_image_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no image-bytes column.*columns are x"):
        open_source(str(tmp_path), "parquet")


@pytest.mark.parametrize("fmt", formats.NAMES)
def test_every_row_is_produced_once_per_epoch_and_bad_ones_replaced(tmp_path, fmt):
    synthesize(str(tmp_path / "img"), num_images=20, image_size=24, classes=4, seed=0)
    for k, (name, data) in enumerate(sorted(bad_objects().items())):
        (tmp_path / "img" / ("circle", "ring")[k % 2] / name).write_bytes(data)
    if fmt != formats.FOLDER:
        from mae_service.data.pack import pack

        pack(str(tmp_path / "img"), str(tmp_path / fmt), fmt=fmt, shard_size=8)
    src = open_source(str(tmp_path / ("img" if fmt == formats.FOLDER else fmt)), fmt, shard_size=8)
    assert src.num_images == 24
    tr = run(src, train=True, epochs=2)
    assert len(tr["image"]) == 48 and tr["epoch"].tolist() == [0] * 24 + [1] * 24
    assert (tr["n_bad"] > 0).sum() == 2 * len(bad_objects())
    assert tr["image"].shape == (48, 3, 16, 16) and tr["image"].dtype == np.uint8
    assert set(tr["label"].tolist()) <= {0, 1, 2, 3}
    assert len(run(src, train=False)["label"]) == 24


def test_shard_of_only_bad_objects_raises(tmp_path):
    for name, data in bad_objects().items():
        (tmp_path / name).write_bytes(data)
    src = open_source(str(tmp_path), "files")
    with pytest.raises(RuntimeError, match="holds no decodable image"):
        run(src, train=True)
