"""`mae-service data index`: a Parquet manifest beside loose files, read instead of listing, refused when stale."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import pytest

from mae_service.cli import main
from mae_service.data.formats.files import MANIFEST_NAME
from mae_service.data.source import open_source
from mae_service.data.synth import synthesize


def listing(src) -> list[tuple[str, int, int]]:
    return [(s.key(i), s.label(i), s.item_id(i)) for s in src.shards for i in range(s.count)]


@pytest.fixture
def images(tmp_path):
    synthesize(str(tmp_path / "img"), num_images=30, image_size=16, classes=3, seed=1)
    return tmp_path / "img"


def test_index_then_open_reads_the_manifest(images, caplog, capsys):
    listed = open_source(str(images), "files", shard_size=8)
    assert main(["data", "index", str(images)]) == 0
    assert "indexed 30 images" in capsys.readouterr().out
    table = pq.read_table(images / MANIFEST_NAME)
    assert table.num_rows == 30 and table.column_names == ["key", "label", "size"]
    assert sorted(table.column("key").to_pylist()) == table.column("key").to_pylist()
    sizes = {k: s for k, s in zip(table.column("key").to_pylist(), table.column("size").to_pylist(), strict=True)}
    assert all((images / k).stat().st_size == s for k, s in sizes.items())
    with caplog.at_level(logging.INFO, logger="mae_service.data.formats.files"):
        indexed = open_source(str(images), "files", shard_size=8)
    assert sum(MANIFEST_NAME in r.getMessage() for r in caplog.records) == 1, "says it uses the manifest"
    assert listing(indexed) == listing(listed) and indexed.class_names == listed.class_names
    assert all(not s.key(i).endswith(MANIFEST_NAME) for s in indexed.shards for i in range(s.count))


def test_images_added_after_the_index_are_not_seen_until_indexed_again(images):
    assert main(["data", "index", str(images)]) == 0
    first = sorted(images.rglob("*.jpg"))[0]
    (first.parent / "extra.jpg").write_bytes(first.read_bytes())
    assert open_source(str(images), "files").num_images == 30
    assert main(["data", "index", str(images)]) == 0
    assert open_source(str(images), "files").num_images == 31


@pytest.mark.parametrize("change", ["delete", "resize"])
def test_stale_manifest_is_a_clear_error(images, change, capsys):
    assert main(["data", "index", str(images)]) == 0
    victim = sorted(images.rglob("*.jpg"))[3]
    if change == "delete":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="stale") as e:
        open_source(str(images), "files")
    msg = str(e.value)
    assert f"mae-service data index {images}" in msg and victim.name in msg and str(images) in msg
    capsys.readouterr()
    assert main(["data", "index", str(images)]) == 0  # indexing again fixes it
    assert open_source(str(images), "files").num_images == (29 if change == "delete" else 30)


def test_index_of_a_missing_folder_exits_2(tmp_path, capsys):
    assert main(["data", "index", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
