"""The driver killed mid-run and the same command resubmitted (issue 13, fault 3): the run continues.

``python -m mae_service pretrain`` runs as a subprocess in its own process group (its own local Ray), checkpoints on
the S3 server every 4 steps, tracking on the MLflow server. Once the step-8 checkpoint is written and MLflow holds
``loss`` of a step after it, the whole process group is SIGKILLed (a driver host lost). The same command then:

- stops what the killed driver's Ray left (:mod:`mae_service.local_ray`) and continues from the latest complete
  checkpoint (also when Ray Train's persisted run state names an older one: a kill after Ray Train wrote a
  checkpoint but before it registered it);
- continues the same MLflow run (one run) to FINISHED, with every ``loss`` step exactly once: the steps the killed
  submission recorded after its last checkpoint are re-trained but not recorded again (a step keeps its first value);
- writes the remaining checkpoints into the same folder, up to the same final step;
- ends with final weights bit-equal to those of the same seeded command run without interruption.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest

from mae_service.data.synth import synthesize
from mae_service.local_ray import processes_under, state_dir
from tests.exact import assert_bit_equal, checkpoint_tensors, metric_history, metric_steps
from tests.ray_procs import ROOT, env_without_loopback_hint, stop_driver
from tests.tiny import TINY_LOCAL

STEPS = 24  # 48 train images / batch 8 = 6 steps per epoch × 4 epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), num_images=60, image_size=32, classes=2, fmt="files", seed=5, val_fraction=0.2)
    return out


def _command(data, storage, server, experiment, run_name):
    return [
        sys.executable,
        "-m",
        "mae_service",
        "pretrain",
        *TINY_LOCAL,
        f"data.train_uri={data / 'train'}",
        f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        "train.epochs=4",
        "train.seed=7",
        "train.checkpoint_every_steps=4",
        "train.picture_every_steps=100",
        "train.keep_checkpoints=10",
        f"mlflow.tracking_uri={server.uri}",
        f"mlflow.experiment={experiment}",
        "mlflow.log_system_metrics=false",
        "registry.register=false",
    ]


def _env(s3_server):
    return {**env_without_loopback_hint(), **s3_server.env}


def _run_to_end(cmd, env, timeout=400):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _wait_for(condition, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen after {timeout:.0f} s")
        time.sleep(0.2)


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _runs(uri, experiment, run_name):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mae.run_name` = '{run_name}'")


def test_killed_driver_resubmitted_continues_the_same_run_exactly(
    s3_server, s3_bucket, mlflow_server, experiment_name, data, tmp_path
):
    s3, env = s3_server.client(), _env(s3_server)
    storage = f"s3://{s3_bucket}/ckpt"

    def keys(prefix):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix=prefix)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    def checkpoints(name):
        return sorted(int(k.split("/")[2][5:]) for k in keys(f"ckpt/{name}/step_") if k.endswith("/meta.json"))

    t0 = time.monotonic()
    _run_to_end(_command(data, storage, mlflow_server, experiment_name, "whole"), env)
    whole_s = time.monotonic() - t0
    (whole,) = _runs(mlflow_server.uri, experiment_name, "whole")
    assert checkpoints("whole") == list(range(4, STEPS + 1, 4))

    cmd = _command(data, storage, mlflow_server, experiment_name, "killed")
    t0 = time.monotonic()
    log = (tmp_path / "killed.log").open("w")  # a file, not a pipe: nobody reads it while the driver runs
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def past_step_8_in_mlflow():
            runs = _runs(mlflow_server.uri, experiment_name, "killed") if 8 in checkpoints("killed") else []
            return bool(runs) and max(metric_steps(mlflow_server.uri, runs[0].info.run_id, "loss"), default=0) > 8

        _wait_for(past_step_8_in_mlflow, proc, 400, "the step-8 checkpoint and a later loss step in MLflow")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process of its group: a lost driver host
        killed_s = time.monotonic() - t0
    finally:
        stop_driver(proc, log)
    killed_dir = state_dir() / f"run-{proc.pid}-0"  # the killed driver's local Ray (mae_service.local_ray)
    (first,) = _runs(mlflow_server.uri, experiment_name, "killed")
    assert first.info.status == "RUNNING"  # nobody closed it
    recorded = metric_steps(mlflow_server.uri, first.info.run_id, "loss")
    at_kill = checkpoints("killed")
    assert at_kill[:2] == [4, 8] and max(recorded) > 8 and max(at_kill) < STEPS, (at_kill, recorded)
    leftovers = [p.pid for p in processes_under(killed_dir)] if killed_dir.exists() else []

    t0 = time.monotonic()
    resubmit = _run_to_end(cmd, env)
    resubmit_s = time.monotonic() - t0
    resumed_from = next((line for line in resubmit.stderr.splitlines() if "continuing from step" in line), None)
    assert resumed_from, resubmit.stderr[-3000:]
    assert not [p for p in leftovers if _alive(p)], leftovers
    assert not killed_dir.exists() or not processes_under(killed_dir)

    runs = _runs(mlflow_server.uri, experiment_name, "killed")
    assert [r.info.run_id for r in runs] == [first.info.run_id]  # the same MLflow run, not a second one
    assert runs[0].info.status == "FINISHED"
    assert metric_steps(mlflow_server.uri, first.info.run_id, "loss") == list(range(1, STEPS + 1))  # each once
    assert metric_steps(mlflow_server.uri, first.info.run_id, "lr") == list(range(1, STEPS + 1))
    assert checkpoints("killed") == list(range(4, STEPS + 1, 4))  # the same folder, continued
    assert runs[0].data.tags["mae.checkpoint_uri"] == f"{storage}/killed/step_{STEPS:08d}"
    a = metric_history(mlflow_server.uri, whole.info.run_id, "loss")
    b = metric_history(mlflow_server.uri, first.info.run_id, "loss")
    assert b == a  # seeded: every step's loss equals the uninterrupted run's, re-trained steps included
    assert_bit_equal(
        checkpoint_tensors(f"{storage}/whole/step_{STEPS:08d}", s3),
        checkpoint_tensors(f"{storage}/killed/step_{STEPS:08d}", s3),
    )
    print(
        f"FIGURES driver killed: uninterrupted {whole_s:.0f} s; killed {killed_s:.0f} s after start with "
        f"checkpoints {at_kill} and loss steps 1–{max(recorded)} in MLflow; {len(leftovers)} Ray processes left "
        f"behind, stopped by the resubmit; resubmit {resubmit_s:.0f} s; {resumed_from}; final weights bit-equal"
    )
