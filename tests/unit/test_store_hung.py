"""A hung S3 store (issue 13, fault 1) at the lowest level: a real TCP server on 127.0.0.1 that accepts connections
and never answers. Every request is abandoned after the request timeout (shortened here to 1 s) and sent again a
bounded number of times; the failure is told from the others and names the URI (no Ray, seconds)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mae_service.data import storage
from mae_service.train.checkpoint import store_unreachable


@pytest.fixture
def hung_endpoint(monkeypatch):
    """``http://127.0.0.1:PORT`` of a server that accepts and never answers; 1 s request timeouts meanwhile."""
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_CONNECT_TIMEOUT_S", 1.0)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for c in held:
        c.close()


def test_pyarrow_requests_to_a_hung_store_fail_after_bounded_attempts(hung_endpoint):
    fs = storage.s3_filesystem("b", hung_endpoint)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        fs.get_file_info("b/ckpt/run/step_00000004/meta.json")
    elapsed = time.monotonic() - t0
    assert storage.unreachable(e.value), e.value
    assert elapsed < 60, elapsed  # 3 attempts of 1 s and their back-off, not a hang
    assert storage.unreachable(ValueError("No space left on device")) is None


def test_a_hung_store_is_not_a_bad_image_but_an_error_naming_the_source(hung_endpoint):
    from mae_service.data.formats import files

    files._clients.clear()  # one boto3 client per process and bucket: build one with the short timeouts
    try:
        objects = files._S3Objects("s3://b/images", hung_endpoint)
        with pytest.raises(ValueError) as e:
            objects.read("b/images/a/0.jpg")
    finally:
        files._clients.clear()
    text = str(e.value)
    assert text.startswith("data source 's3://b/images': cannot read s3://b/images/a/0.jpg: Read timeout"), text
    assert "3 attempts" in text and storage.unreachable(text)


def test_store_unreachable_names_the_uri_that_did_not_answer():
    upload = OSError(
        "When uploading part for key 'ckpt/r/step_00000008/model.safetensors' in bucket 'b': AWS Error "
        "NETWORK_CONNECTION during UploadPart operation: curlCode: 28, Timeout was reached"
    )
    try:
        raise RuntimeError("Training failed: a worker raised") from upload
    except RuntimeError as e:
        line = store_unreachable(e, "s3://b/ckpt", "s3://b/data/train")
    assert line is not None and line.startswith("train.storage_path='s3://b/ckpt': the S3 store stopped answering")
    assert "s3://b/ckpt/r/step_00000008/model.safetensors" in line and "resubmit" in line and "\n" not in line

    read = RuntimeError(
        "RayTaskError(ValueError): ray::MapBatches()\n  File ...\nValueError: data source 's3://b/data/train': "
        'cannot read s3://b/data/train/a/0.jpg: Read timeout on endpoint URL: "http://127.0.0.1:1/b/data/train/a/'
        '0.jpg", 3 attempts (check the S3 endpoint)\n'
    )
    line = store_unreachable(read, "s3://b/ckpt", "s3://b/data/train")
    assert line is not None and line.startswith("data.train_uri='s3://b/data/train': the S3 store stopped"), line
    assert "\n" not in line

    listing = OSError("When listing objects under key 'data/train/a' in bucket 'b': AWS Error NETWORK_CONNECTION")
    line = store_unreachable(listing, "s3://b/ckpt", "s3://b/data/train")
    assert line is not None and line.startswith("data.train_uri='s3://b/data/train'"), line
    assert store_unreachable(RuntimeError("CUDA out of memory"), "s3://b/ckpt", "s3://b/data") is None
    assert store_unreachable(upload, "/local/ck", "/local/data") is None  # not an S3 run: nothing to name
