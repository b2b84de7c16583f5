"""One way to reach storage: ``s3://bucket/prefix`` or a local path → a pyarrow filesystem and a path in it.

Data reads, synthetic-data writes and checkpoints all go through :func:`filesystem_for`, so a local folder and
an S3 bucket take the same code path. S3 settings come from the standard AWS environment (credentials chain,
``AWS_REGION``/``AWS_DEFAULT_REGION``), with the endpoint from the ``s3_endpoint`` argument or
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for S3-compatible stores. Retries and timeouts are kept low so a
wrong endpoint, wrong credentials or a missing bucket fail in seconds with an error naming the URI.

A hung store (connections accepted, never answered) is bounded the same way, for pyarrow and boto3 alike: a
request that gets no byte for :data:`S3_REQUEST_TIMEOUT_S` is abandoned and sent again, with the AWS SDKs'
standard back-off, at most :data:`S3_MAX_ATTEMPTS` times in all. So one operation (a read, a listing, a
checkpoint part upload) rides out a stall of up to about ``(S3_MAX_ATTEMPTS - 1) × S3_REQUEST_TIMEOUT_S`` (40 s),
and fails after about ``S3_MAX_ATTEMPTS × S3_REQUEST_TIMEOUT_S`` (60 s) when the store stays down;
:func:`unreachable` tells such a failure from the others.

:func:`s3_client` gives a boto3 client built from the same settings, for reads of whole small objects: pyarrow's
filesystem sends a HEAD before each GET, which doubles the requests for loose image files.
"""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import urlparse

import pyarrow.fs as pafs


def _setting(name: str, default: float) -> float:
    """A positive number from environment variable ``name`` (unset or empty: ``default``)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: must be a positive number")
    return value


S3_MAX_ATTEMPTS = int(_setting("MAE_S3_MAX_ATTEMPTS", 3))
"""Attempts per S3 request in all (the first and its retries); environment variable ``MAE_S3_MAX_ATTEMPTS``."""
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = _setting("MAE_S3_REQUEST_TIMEOUT_S", 20.0)
"""Seconds without a byte moving before a request is abandoned (pyarrow: curl's low-speed limit; boto3: the
socket read timeout). Not a limit on a transfer that keeps moving. Environment variable
``MAE_S3_REQUEST_TIMEOUT_S`` (set where the driver starts, so the Ray workers get it too)."""

_UNREACHABLE = re.compile(
    r"AWS Error NETWORK_CONNECTION|curlCode: \d+|Timeout was reached|Couldn't connect to server"
    r"|(?:Read|Connect) timeout on endpoint URL|Could not connect to the endpoint URL|Connection was closed before"
)


def unreachable(error: BaseException | str) -> str | None:
    """The part of ``error`` (an exception or its text) that says the S3 store did not answer (a timeout, a
    refused or dropped connection, after the retries); None for any other error."""
    text = str(error)
    m = _UNREACHABLE.search(text)
    if m is None:
        return None
    line = next(ln for ln in text.splitlines() if m.group(0) in ln)
    return line.strip()


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region(bucket: str, endpoint: str | None) -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    if endpoint is None and bucket:
        try:
            return pafs.resolve_s3_region(bucket)
        except OSError:
            pass
    return "us-east-1"


def s3_filesystem(bucket: str = "", s3_endpoint: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem with low retry counts and timeouts (the AWS credential chain supplies credentials)."""
    endpoint = s3_endpoint or endpoint_from_env()
    kwargs: dict = {
        "region": _region(bucket, endpoint),
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def s3_endpoint_url(s3_endpoint: str | None = None) -> str | None:
    """The endpoint (argument, else environment) as a URL; ``https://`` when it names no scheme."""
    endpoint = s3_endpoint or endpoint_from_env()
    if not endpoint:
        return None
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def s3_client(bucket: str = "", s3_endpoint: str | None = None, max_pool_connections: int = 16):
    """A boto3 S3 client with the endpoint, region, retries and timeouts of :func:`s3_filesystem` (credentials
    from the standard AWS chain). Thread-safe: share one per process."""
    import boto3
    from botocore.config import Config

    url = s3_endpoint_url(s3_endpoint)
    config = Config(
        region_name=_region(bucket, url),
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_REQUEST_TIMEOUT_S,
        retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        # path-style requests, as pyarrow sends them, when the endpoint is an S3-compatible store
        s3={"addressing_style": "path"} if url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=url, config=config)


def filesystem_for(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` → ``(filesystem, path inside it)``; ``s3://bucket/key`` gives ``"bucket/key"``."""
    if not uri:
        raise ValueError("empty storage URI: give s3://bucket/prefix or a local path")
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: no bucket name (expected s3://bucket/prefix)")
        path = posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")
        return s3_filesystem(parsed.netloc, s3_endpoint), path
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(urlparse(uri).path)
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise ValueError(
                f"{uri!r}: unsupported storage URI ({e}); use s3://bucket/prefix or a local path"
            ) from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join a URI or path with relative parts using '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out
