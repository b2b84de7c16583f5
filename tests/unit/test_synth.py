"""Synthetic data: decodable, labelled, balanced, deterministic; wds/parquet shards listable; `data pack`."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from mae_service.cli import main
from mae_service.data import formats, open_source
from mae_service.data.decode import decode_image
from mae_service.data.synth import CLASSES, draw_image, synthesize


def test_synth_files_writes_decodable_labelled_images(tmp_path):
    counts = synthesize(str(tmp_path), num_images=60, image_size=32, classes=12, seed=3, val_fraction=0.2)
    assert counts == {"val": 12, "train": 48}
    files = sorted((tmp_path / "train").glob("*/*"))
    assert len(files) == 48
    per_class = collections.Counter(f.parent.name for f in files)
    assert set(per_class) == set(CLASSES) and max(per_class.values()) - min(per_class.values()) <= 2
    exts = collections.Counter(f.suffix for f in files)
    assert exts[".jpg"] > 0 and exts[".png"] > 0
    for f in files:
        assert f.name.startswith(f.parent.name)
        img = decode_image(f.read_bytes())
        assert img.size == (32, 32) and img.mode == "RGB"
    src = open_source(str(tmp_path / "train"), "files", shard_size=16)
    assert src.num_images == 48 and src.class_names == sorted(CLASSES) and len(src.shards) == 3
    assert {len(set(s.labels)) for s in src.shards} != {1}, "shards must mix classes"


def test_synth_is_deterministic_and_class_is_not_colour(tmp_path):
    synthesize(str(tmp_path / "a"), num_images=12, image_size=32, seed=5)
    synthesize(str(tmp_path / "b"), num_images=12, image_size=32, seed=5)
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a)
    # Same class, different seeds: brightness differs a lot (the class is the shape, not the grey level).
    means = [np.asarray(draw_image("circle", 32, np.random.default_rng(s)), np.float32).mean((0, 1)) for s in range(8)]
    assert np.std(means, axis=0).mean() > 15


@pytest.mark.parametrize("fmt", formats.PACK_TARGETS)  # the sharded formats, which write _index.json
def test_synth_shards_are_listable(tmp_path, fmt):
    synthesize(str(tmp_path), num_images=50, image_size=16, classes=10, fmt=fmt, shard_size=20)
    index = json.loads((tmp_path / "_index.json").read_text())
    assert sum(index["shards"].values()) == 50 and len(index["class_names"]) == 10
    src = open_source(str(tmp_path), fmt)
    assert src.num_images == 50 and src.class_names == list(CLASSES[:10])
    assert [s.count for s in src.shards] == [20, 20, 10]


def test_wds_listing_without_index_counts_tar_headers(tmp_path):
    synthesize(str(tmp_path), num_images=30, image_size=16, fmt="wds", shard_size=8)
    (tmp_path / "_index.json").unlink()
    src = open_source(str(tmp_path), "wds")
    assert [s.count for s in src.shards] == [8, 8, 8, 6] and src.class_names == []


def test_cli_synth_and_pack(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "img"), "--num-images", "40", "--image-size", "16"]) == 0
    assert (
        main(["data", "pack", str(tmp_path / "img"), str(tmp_path / "wds"), "--format", "wds", "--shard-size", "15"])
        == 0
    )
    src = open_source(str(tmp_path / "wds"), "wds")
    assert src.num_images == 40 and len(src.shards) == 3 and len(src.class_names) == 12
    assert main(["data", "pack", str(tmp_path / "img"), str(tmp_path / "pq"), "--format", "parquet"]) == 0
    assert open_source(str(tmp_path / "pq"), "parquet").num_images == 40
    assert main(["data", "synth", str(tmp_path / "x"), "--classes", "99"]) == 2
    assert main(["data", "pack", str(tmp_path / "img"), str(tmp_path / "y"), "--format", "zip"]) == 2
    err = capsys.readouterr().err
    assert "--classes=99" in err and "'zip'" in err


def test_open_source_errors_name_the_uri(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        open_source(str(tmp_path / "nope"), "files")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images found"):
        open_source(str(tmp_path / "empty"), "files")
    with pytest.raises(ValueError, match="no .tar shards"):
        open_source(str(tmp_path / "empty"), "wds")
    with pytest.raises(ValueError, match="allowed files, wds, parquet"):
        open_source(str(tmp_path), "zip")


def test_unlabelled_folder_gives_label_minus_one(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    src = open_source(str(tmp_path), "files")
    assert src.class_names == [] and src.shards[0].labels.tolist() == [-1, -1]
