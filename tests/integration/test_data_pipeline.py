"""The data pipeline against a real S3 server (moto on 127.0.0.1) and a local Ray: all three formats through the
same s3:// code path, labels, bad objects, clear errors, determinism, equal ranks, resume."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mae_service.data import eval_dataset, open_source, samples_per_rank, synthesize, train_dataset
from mae_service.data.pack import pack
from mae_service.data.synth import CLASSES
from tests.servers import S3Server
from tests.unit.test_data_readers import run
from tests.unit.test_decode import bad_objects

N = 48  # 12 classes × 4, 32 px


@pytest.fixture(scope="module")
def data(s3_server):
    """One bucket: the same images as files/, wds/ and pq/, plus bad/ (with corrupt objects) and allbad/."""
    bucket = s3_server.make_bucket(f"data-{uuid.uuid4().hex[:10]}")
    root = f"s3://{bucket}"
    synthesize(f"{root}/files", num_images=N, image_size=32, classes=12, seed=1)
    pack(f"{root}/files", f"{root}/wds", fmt="wds", shard_size=20)
    pack(f"{root}/files", f"{root}/pq", fmt="parquet", shard_size=20)
    synthesize(f"{root}/bad", num_images=24, image_size=32, classes=3, seed=2)
    c = s3_server.client()
    for k, (name, payload) in enumerate(sorted(bad_objects().items())):
        c.put_object(Bucket=bucket, Key=f"bad/{CLASSES[k % 3]}/{name}", Body=payload)
        c.put_object(Bucket=bucket, Key=f"allbad/{name}", Body=payload)
    c.put_object(Bucket=bucket, Key="bad/README.txt", Body=b"not part of the data")
    pack(f"{root}/bad", f"{root}/badwds", fmt="wds", shard_size=100)
    return root


@pytest.fixture(scope="module")
def ray_data(ray_local):
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray_local


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=64, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def fingerprints(cols: dict[str, np.ndarray]) -> list[tuple[int, str]]:
    return sorted(
        (int(lab), hashlib.sha1(img.tobytes()).hexdigest())
        for lab, img in zip(cols["label"], cols["image"], strict=True)
    )


def test_three_formats_read_the_same_labelled_images_from_s3(ray_data, data):
    seen = {}
    for fmt, prefix in [("files", "files"), ("wds", "wds"), ("parquet", "pq")]:
        src = open_source(f"{data}/{prefix}", fmt, shard_size=16)
        assert src.num_images == N and src.class_names == sorted(CLASSES)
        cols = collect(eval_dataset(src, image_size=32))
        assert cols["image"].shape == (N, 3, 32, 32) and cols["image"].dtype == np.uint8
        assert set(cols) == {"image", "label"}
        assert np.bincount(cols["label"]).tolist() == [4] * 12
        if fmt == "files":  # labels are the class folders, in listing order
            assert cols["label"].tolist() == [lab for s in src.shards for lab in s.labels]
            names = [s.key(i).split("/")[-2] for s in src.shards for i in range(s.count)]
            assert [src.class_names[lab] for lab in cols["label"]] == names
        seen[fmt] = fingerprints(cols)
    assert seen["files"] == seen["wds"] == seen["parquet"]


@pytest.mark.parametrize("fmt,prefix", [("files", "files"), ("parquet", "pq")])
def test_same_seed_same_batches_and_resume_is_the_tail(ray_data, data, fmt, prefix):
    src = open_source(f"{data}/{prefix}", fmt, shard_size=16)
    kw = dict(rank=0, world_size=2, image_size=32, batch_size=4, epochs=2)
    a = collect(train_dataset(src, seed=0, **kw))
    b = collect(train_dataset(src, seed=0, **kw))
    c = collect(train_dataset(src, seed=1, **kw))
    per = samples_per_rank(src, 2, 4)
    assert per == 24 and len(a["image"]) == 2 * per
    assert set(a) == {"image", "label", "epoch", "n_bad"} and a["n_bad"].sum() == 0
    assert a["epoch"].tolist() == [0] * per + [1] * per
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["image"][:per], a["image"][per:])  # epochs differ (order and crops)
    r = collect(train_dataset(src, seed=0, start_sample=30, **kw))
    for k in a:
        assert np.array_equal(r[k], a[k][30:]), k


def test_fetch_only_stream_through_ray_data_decodes_on_the_worker(ray_data, data):
    """``decode_device="cuda"``: the encoded bytes survive Ray Data's blocks, and decoding them where the training
    worker would (here with ``device="cpu"``) gives the CPU stream's rows, labels and crops."""
    from mae_service.train.device_decode import decoded_batches

    src = open_source(f"{data}/files", "files", shard_size=16)
    kw = dict(rank=0, world_size=1, image_size=16, seed=3, batch_size=8, epochs=1)
    cpu = collect(train_dataset(src, **kw))
    raw_ds = train_dataset(src, decode_device="cuda", **kw)
    out = list(decoded_batches(raw_ds.iter_batches(batch_size=8, batch_format="numpy"), seed=3, size=16, device="cpu"))
    images = np.concatenate([b["image"].numpy() for b in out])
    assert images.shape == cpu["image"].shape == (N, 3, 16, 16)
    assert np.concatenate([b["label"].numpy() for b in out]).tolist() == cpu["label"].tolist()
    assert sum(int(b["n_bad"].sum()) for b in out) == 0
    assert np.abs(images.astype(np.int16) - cpu["image"].astype(np.int16)).mean() <= 8


def test_two_ranks_get_equal_counts(ray_data, data):
    src = open_source(f"{data}/wds", "wds")
    per = samples_per_rank(src, 2, 8)
    streams = [
        collect(train_dataset(src, rank=r, world_size=2, image_size=16, seed=3, batch_size=8, epochs=2))
        for r in range(2)
    ]
    for s in streams:
        assert len(s["label"]) == 2 * per == 48
        assert np.bincount(s["epoch"]).tolist() == [per, per]
    # Disjoint within an epoch: together the ranks see each class 4 times.
    both = np.concatenate([s["label"][s["epoch"] == 0] for s in streams])
    assert np.bincount(both, minlength=12).tolist() == [4] * 12


@pytest.mark.parametrize("fmt,prefix", [("files", "bad"), ("wds", "badwds")])
def test_bad_objects_are_replaced_and_counted(ray_data, data, fmt, prefix):
    src = open_source(f"{data}/{prefix}", fmt, shard_size=100)
    n = 24 + len(bad_objects())
    assert src.num_images == n  # README.txt is ignored; the bad objects look like images until decoded
    cols = collect(train_dataset(src, rank=0, world_size=1, image_size=16, seed=0, batch_size=1, epochs=1))
    assert len(cols["image"]) == n and cols["image"].shape[1:] == (3, 16, 16)
    assert len(bad_objects()) <= cols["n_bad"].sum() <= 2 * len(bad_objects())
    assert (cols["n_bad"] > 0).sum() == len(bad_objects())
    assert len(collect(eval_dataset(src, image_size=16))["label"]) == n


def test_shard_without_a_good_image_is_a_clear_error(ray_data, data):
    src = open_source(f"{data}/allbad", "files")
    with pytest.raises(Exception, match="holds no decodable image"):
        collect(train_dataset(src, rank=0, world_size=1, image_size=16, seed=0, batch_size=1, epochs=1))


def test_missing_bucket_or_prefix_or_endpoint_fail_fast_naming_the_uri(s3_server):
    for uri, why in [
        ("s3://no-such-bucket-xyz/data", "does not exist"),
        (f"s3://{s3_server.make_bucket('empty-b')}/x", "nothing found"),
    ]:
        t = time.monotonic()
        with pytest.raises(ValueError, match=why) as e:
            open_source(uri, "files")
        assert uri in str(e.value) and time.monotonic() - t < 5
    t = time.monotonic()
    with pytest.raises(ValueError, match="endpoint") as e:
        open_source("s3://any-bucket/x", "wds", s3_endpoint="http://127.0.0.1:9")
    assert "s3://any-bucket/x" in str(e.value) and time.monotonic() - t < 10


def test_wrong_credentials_fail_fast_naming_the_uri(s3_server, data, tmp_path, monkeypatch):
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # this server checks credentials; ours are unknown
    strict = S3Server(tmp_path)
    try:
        t = time.monotonic()
        with pytest.raises(ValueError, match="credentials") as e:
            open_source("s3://some-bucket/images", "files", s3_endpoint=strict.endpoint)
        assert "s3://some-bucket/images" in str(e.value) and time.monotonic() - t < 5
        # Listed with good credentials, read where they are refused (e.g. a worker without them): the task fails
        # naming the source, rather than skipping every image as bad.
        src = dataclasses.replace(open_source(f"{data}/files", "files"), s3_endpoint=strict.endpoint)
        t = time.monotonic()
        with pytest.raises(ValueError, match="credentials") as e:
            run(src, train=True)
        assert f"{data}/files" in str(e.value) and time.monotonic() - t < 5
        assert "testing" not in str(e.value)  # the access key id and secret of AWS_TEST_ENV
    finally:
        strict.stop()


def _upload(s3_server, local: Path, bucket: str, prefix: str) -> None:
    c = s3_server.client()
    for f in sorted(local.rglob("*")):
        if f.is_file():
            c.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(local).as_posix()}", Body=f.read_bytes())


def _served(s3_server, bucket: str, prefix: str, want_gets: int) -> tuple[int, int]:
    """(GET, HEAD) requests served for objects under ``bucket/prefix``, once ``want_gets`` GETs are logged."""
    path = f"/{bucket}/{prefix}/"
    deadline = time.monotonic() + 10
    while s3_server.requests("GET", path) < want_gets and time.monotonic() < deadline:
        time.sleep(0.1)
    return s3_server.requests("GET", path), s3_server.requests("HEAD", path)


def test_loose_files_from_s3_equal_local_with_one_get_per_object(s3_server, s3_bucket, tmp_path):
    """The decode tasks' output (run in this process) from S3 is the local one, byte for byte, and every loose
    object costs the server one GET and no HEAD."""
    synthesize(str(tmp_path / "img"), num_images=24, image_size=32, classes=4, seed=5)
    _upload(s3_server, tmp_path / "img", s3_bucket, "img")
    local = open_source(str(tmp_path / "img"), "files", shard_size=8)
    remote = open_source(f"s3://{s3_bucket}/img", "files", shard_size=8)
    assert remote.num_images == local.num_images == 24
    assert _served(s3_server, s3_bucket, "img", 0) == (0, 0)  # listing requests are not per object
    for train in (True, False):
        a, b = run(local, train=train, epochs=2), run(remote, train=train, epochs=2)
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), (train, k)
    n = 2 * 24 + 24  # two training epochs and one eval pass
    assert _served(s3_server, s3_bucket, "img", n) == (n, 0)


def test_loose_objects_deleted_after_listing(s3_server, s3_bucket, tmp_path):
    """A missing key is a bad item (replaced, counted); a missing bucket is an error naming the source."""
    synthesize(str(tmp_path / "img"), num_images=6, image_size=16, classes=2, seed=6)
    _upload(s3_server, tmp_path / "img", s3_bucket, "img")
    src = open_source(f"s3://{s3_bucket}/img", "files")
    c = s3_server.client()
    c.delete_object(Bucket=s3_bucket, Key=src.shards[0].key(0).split("/", 1)[1])
    cols = run(src, train=True)
    assert len(cols["image"]) == 6 and (cols["n_bad"] > 0).sum() == 1
    for i in range(src.shards[0].count):
        c.delete_object(Bucket=s3_bucket, Key=src.shards[0].key(i).split("/", 1)[1])
    c.delete_bucket(Bucket=s3_bucket)
    with pytest.raises(ValueError, match="does not exist") as e:
        run(src, train=True)
    assert f"s3://{s3_bucket}/img" in str(e.value)
