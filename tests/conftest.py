"""Shared fixtures: the real services the integration and e2e tests use (see ``tests/servers.py``)."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.servers import AWS_TEST_ENV, QUIET_ENV, MlflowServer, S3Server

for _k, _v in {**QUIET_ENV, "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_k, _v)


def pytest_collection_modifyitems(config, items):
    """Tier marker from the folder: tests/unit → unit, tests/integration → integration, tests/e2e → e2e."""
    for item in items:
        for tier in ("unit", "integration", "e2e"):
            if f"/tests/{tier}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1; its endpoint and dummy credentials are exported for the session."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test."""
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """``mlflow server`` on 127.0.0.1 (SQLite store, artifacts on the S3 server)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server)
    yield server
    server.stop()


@pytest.fixture
def experiment_name(request):
    """A fresh MLflow experiment name per test."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``mae-service …`` in this process; returns (exit code, stdout, stderr). Env changes are undone."""
    for key in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
        "MLFLOW_TRACKING_USERNAME",  # set from http://user:password@… tracking URIs
        "MLFLOW_TRACKING_PASSWORD",
    ):
        old = os.environ.get(key)
        monkeypatch.setenv(key, old or "")  # recorded, so the CLI's setdefault is undone after the test
        if old is None:
            monkeypatch.delenv(key)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        from mae_service.cli import main

        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


__all__ = ["AWS_TEST_ENV"]


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local single-node Ray on 127.0.0.1 (4 logical CPUs so Ray Data has room beside 2 train workers).

    Module-scoped: one Ray instance at a time on this machine, and the e2e tests start their own cluster.
    The dashboard (on loopback) is on: without its state API, Ray Train's controller cleanup waits for minutes.
    The S3 endpoint and credentials are in the environment before ``ray.init``, so workers inherit them.
    """
    import ray

    ray.init(
        num_cpus=4,
        _node_ip_address="127.0.0.1",
        object_store_memory=1 << 30,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        # System metrics at MLflow's default interval (10 s): rank 0's logger takes a last sample when it closes,
        # so even a run shorter than one interval records some (MLflow's own monitor logs none then).
        runtime_env={"env_vars": {**s3_server.env, **QUIET_ENV}},
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_cluster(s3_server):
    """The two-node Ray cluster of ``cluster/local.sh`` (head 127.0.0.2, worker node 127.0.0.3, token auth on).

    Started with the S3 server's endpoint and credentials in its environment, so job drivers and workers reach
    it; so does anything else in ``os.environ`` then (e.g. ``MLFLOW_TRACKING_URI``). Yields the client variables
    that ``up`` exports (``RAY_ADDRESS``, ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``): run ``ray job submit`` with
    ``env={**os.environ, **local_cluster}``. Module-scoped, and never alive beside ``ray_local``.
    """
    import shlex
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "cluster" / "local.sh"
    up = subprocess.run([str(script), "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([str(script), "down"], capture_output=True, timeout=120)
        pytest.fail(f"cluster/local.sh up failed ({up.returncode}):\n{up.stderr[-4000:]}")
    exports = {}
    for line in up.stdout.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export", f"cluster/local.sh up printed a line that is not an export: {line!r}"
        key, value = assignment.split("=", 1)
        exports[key] = value
    try:
        yield exports
    finally:
        subprocess.run([str(script), "down"], capture_output=True, timeout=120)
