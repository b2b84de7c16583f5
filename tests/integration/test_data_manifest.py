"""`mae-service data index` on a real S3 server (moto on 127.0.0.1): the manifest is read instead of listing, the
decode tasks read the same bytes through it, and a manifest naming a deleted object is refused."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mae_service.data import open_source, synthesize
from mae_service.data.formats.files import MANIFEST_NAME
from tests.unit.test_data_manifest import listing
from tests.unit.test_data_readers import run


def lists(s3_server, bucket: str) -> int:
    """LIST requests served for ``bucket`` so far."""
    return len(re.findall(rf"GET /{bucket}/?\?\S*list-type=2", s3_server.log_path.read_text(errors="replace")))


def test_index_on_s3_is_read_instead_of_listing(s3_server, s3_bucket, cli):
    uri = f"s3://{s3_bucket}/img"
    synthesize(uri, num_images=24, image_size=16, classes=3, seed=4)
    before = lists(s3_server, s3_bucket)
    listed = open_source(uri, "files", shard_size=8)
    listing_lists = lists(s3_server, s3_bucket) - before
    rc, out, _ = cli("data", "index", uri)
    assert rc == 0 and f"{uri}/{MANIFEST_NAME}" in out
    before = lists(s3_server, s3_bucket)
    indexed = open_source(uri, "files", shard_size=8)
    assert listing(indexed) == listing(listed) and indexed.class_names == listed.class_names
    # without the manifest: the root, the top level, then each of the 3 class folders (in parallel); with it, the
    # root and the top level only
    assert listing_lists - (lists(s3_server, s3_bucket) - before) == 3
    a, b = run(listed, train=True), run(indexed, train=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    s3_server.client().delete_object(Bucket=s3_bucket, Key=indexed.shards[1].key(2).split("/", 1)[1])
    with pytest.raises(ValueError, match="stale") as e:
        open_source(uri, "files")
    assert f"mae-service data index {uri}" in str(e.value)
    rc, _, err = cli("data", "index", uri)
    assert rc == 0 and open_source(uri, "files").num_images == 23
