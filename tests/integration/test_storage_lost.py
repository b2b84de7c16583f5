"""The S3 store hung mid-run (issue 13, fault 1): data and checkpoints on ``s3://``, on an S3 server of each test
alone (it gets paused), MLflow on SQLite (so the fault is the storage alone: the MLflow server's artifacts would
live on the same store).

``python -m mae_service pretrain`` runs as a subprocess (its own local Ray). Once the first checkpoint exists, the
S3 server's process group is SIGSTOPped: it accepts connections (the kernel does) and never answers, a hung store.

- hung for 25 s, then SIGCONT: the run finishes (exit 0) with every checkpoint, every ``loss`` step once in a
  FINISHED MLflow run, and the final weights and loss of the same seeded command run without the fault;
- hung for good: the run fails with exit 2 and one line naming the ``s3://`` URI it could not reach, well within
  the subprocess timeout (the store's requests have timeouts and a bounded number of attempts, never a hang).
  This case shortens the request timeout (``MAE_S3_REQUEST_TIMEOUT_S=5``, default 20 s) and sets
  ``train.max_failures=0``: the time to fail scales with both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import pytest

from mae_service.data.synth import synthesize
from tests.exact import assert_bit_equal, checkpoint_tensors, metric_history, metric_steps
from tests.ray_procs import ROOT, env_without_loopback_hint, stop_driver
from tests.servers import AWS_TEST_ENV, S3Server
from tests.tiny import TINY_LOCAL

STEPS = 16  # 32 train images / batch 8 = 4 steps per epoch × 4 epochs
DOWN_TIMEOUT_S = 420  # the bound a store that stays down must fail the run within (the test's own timeout)


@pytest.fixture
def own_s3(tmp_path):
    """An S3 server of this test alone (it gets paused); resumed and stopped at the end whatever happened."""
    log_dir = tmp_path / "s3"
    log_dir.mkdir()
    server = S3Server(log_dir)
    yield server
    try:
        os.killpg(server.proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
    except ProcessLookupError:
        pass
    server.stop()


@pytest.fixture
def on_s3(own_s3, monkeypatch):
    """A bucket on ``own_s3`` holding a small labelled image set under ``data/train``; returns the bucket."""
    for k, v in AWS_TEST_ENV.items():  # this process writes the images (the driver gets them in its env)
        monkeypatch.setenv(k, v)
    bucket = own_s3.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    synthesize(
        f"s3://{bucket}/data",
        num_images=40,
        image_size=32,
        classes=2,
        fmt="files",
        seed=11,
        val_fraction=0.2,
        s3_endpoint=own_s3.endpoint,
    )
    return bucket


def _command(bucket, tracking_uri, run_name, *extra):
    return [
        sys.executable,
        "-m",
        "mae_service",
        "pretrain",
        *TINY_LOCAL,
        f"data.train_uri=s3://{bucket}/data/train",
        f"train.storage_path=s3://{bucket}/ckpt",
        f"train.run_name={run_name}",
        "train.epochs=4",
        "train.seed=3",
        "train.checkpoint_every_steps=4",
        "train.picture_every_steps=100",
        "train.keep_checkpoints=10",
        f"mlflow.tracking_uri={tracking_uri}",
        "mlflow.experiment=storage-lost",
        "mlflow.log_system_metrics=false",
        "registry.register=false",
        *extra,
    ]


def _env(s3):
    return {**env_without_loopback_hint(), **s3.env}


def _quick_client(s3):
    """A client that gives up fast: the test's own polling must never hang on the paused server."""
    from botocore.config import Config

    return s3.client(Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))


def _checkpoints(client, bucket, run_name):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"ckpt/{run_name}/step_")
    keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
    return sorted(int(k.split("/")[2][5:]) for k in keys if k.endswith("/meta.json"))


def _start(cmd, env, log_path):
    log = log_path.open("w")  # a file, not a pipe: nobody reads it while the driver runs
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _pause_after_first_checkpoint(s3, proc, bucket, run_name, timeout=300):
    """Wait (the driver running) until the first checkpoint's meta.json exists, then SIGSTOP the S3 server."""
    client = _quick_client(s3)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before the first checkpoint")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint after {timeout} s")
        try:
            if _checkpoints(client, bucket, run_name):
                break
        except Exception:  # noqa: BLE001 - a slow answer of the busy server: ask again
            pass
        time.sleep(0.2)
    os.killpg(s3.proc.pid, signal.SIGSTOP)
    return time.monotonic()


def _run(tracking_uri, run_name):
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("storage-lost")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mae.run_name` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_store_hung_25s_then_back_the_run_finishes_exactly(own_s3, on_s3, tmp_path):
    bucket, env, tracking = on_s3, _env(own_s3), f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.monotonic()
    whole = subprocess.run(
        _command(bucket, tracking, "whole"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    whole_s = time.monotonic() - t0
    assert whole.returncode == 0, whole.stderr[-4000:]

    proc, log = _start(_command(bucket, tracking, "hung"), env, tmp_path / "hung.log")
    try:
        t0 = time.monotonic()
        paused = _pause_after_first_checkpoint(own_s3, proc, bucket, "hung")
        requests_at_pause = len(own_s3.log_path.read_bytes().splitlines())
        while time.monotonic() - paused < 25 and proc.poll() is None:
            time.sleep(0.5)
        os.killpg(own_s3.proc.pid, signal.SIGCONT)
        rc = proc.wait(300)
        run_s = time.monotonic() - t0
    finally:
        os.killpg(own_s3.proc.pid, signal.SIGCONT)
        stop_driver(proc, log)
    output = (tmp_path / "hung.log").read_text()
    assert rc == 0, output[-4000:]
    client = own_s3.client()
    assert _checkpoints(client, bucket, "hung") == list(range(4, STEPS + 1, 4))
    run = _run(tracking, "hung")
    assert run.info.status == "FINISHED"
    assert metric_steps(tracking, run.info.run_id, "loss") == list(range(1, STEPS + 1))  # each step once
    assert run.data.tags["mae.checkpoint_uri"] == f"s3://{bucket}/ckpt/hung/step_{STEPS:08d}"
    reference = _run(tracking, "whole")
    assert metric_history(tracking, run.info.run_id, "loss") == metric_history(
        tracking, reference.info.run_id, "loss"
    )  # seeded: the pause changed no step's data or result
    assert_bit_equal(
        checkpoint_tensors(f"s3://{bucket}/ckpt/whole/step_{STEPS:08d}", client),
        checkpoint_tensors(f"s3://{bucket}/ckpt/hung/step_{STEPS:08d}", client),
    )
    served_after = len(own_s3.log_path.read_bytes().splitlines()) - requests_at_pause
    print(
        f"FIGURES store hung 25 s: uninterrupted {whole_s:.0f} s; faulted run {run_s:.0f} s, paused "
        f"{paused - t0:.0f} s after start, exit {rc}; {served_after} S3 requests served from the pause to the end; "
        "final weights bit-equal, loss equal at every step"
    )


def test_store_down_for_good_fails_clearly_in_bounded_time(own_s3, on_s3, tmp_path):
    bucket, env, tracking = on_s3, _env(own_s3), f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["MAE_S3_REQUEST_TIMEOUT_S"] = "5"  # the bound scales with it: 5 s keeps the test short (default 20 s)
    proc, log = _start(_command(bucket, tracking, "down", "train.max_failures=0"), env, tmp_path / "down.log")
    try:
        t0 = time.monotonic()
        paused = _pause_after_first_checkpoint(own_s3, proc, bucket, "down")
        try:
            rc = proc.wait(DOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run still had not failed {DOWN_TIMEOUT_S} s after the store hung for good")
        fail_s = time.monotonic() - paused
    finally:
        stop_driver(proc, log)
        os.killpg(own_s3.proc.pid, signal.SIGCONT)
    output = (tmp_path / "down.log").read_text()
    assert rc == 2, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("mae-service pretrain: error:")]
    assert len(errors) == 1, output[-4000:]
    assert f"s3://{bucket}/" in errors[0], errors[0]
    run = _run(tracking, "down")
    assert run.info.status == "FAILED"
    print(
        f"FIGURES store down for good: paused {paused - t0:.0f} s after start, exit {rc} {fail_s:.0f} s after the "
        f"pause: {errors[0]}"
    )
