"""The user's path: ``ray job submit … -- python jobs/pretrain.py`` (and ``jobs/sweep.py``) to the two-node local
cluster, data and checkpoints on the local S3 server, tracking to a real ``mlflow server``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from mae_service.data.synth import synthesize
from tests.tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
TINY = [
    *TINY_MODEL,
    "train.batch_size=16",
    "data.shard_size=16",
    "train.warmup_epochs=1",
    "train.lr=1e-3",
    "mlflow.log_system_metrics=false",
]


def submit(cluster: dict[str, str], script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [str(RAY), "job", "submit", "--working-dir", str(ROOT), "--", "python", script, *args]
    out = subprocess.run(cmd, env={**os.environ, **cluster}, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and "succeeded" in out.stdout, out.stdout[-6000:] + out.stderr[-3000:]
    return out


def _job(cluster: dict[str, str], *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [str(RAY), "job", *args], env={**os.environ, **cluster}, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr  # Ray's CLI writes some of its lines to stderr


def test_pretrain_job_stopped_mid_run_continues_when_resubmitted(local_cluster, s3_server, s3_bucket, mlflow_server):
    """``ray job stop`` once the first checkpoint is on S3, then the same ``ray job submit``: the job continues the
    same run (one MLflow run, the same checkpoint folder) to the same final step, each ``loss`` step once."""
    synthesize(f"s3://{s3_bucket}/data", num_images=80, image_size=32, classes=4, fmt="files", seed=0, val_fraction=0.2)
    args = [
        "--config",
        "jobs/configs/demo.yaml",
        *TINY,
        f"data.train_uri=s3://{s3_bucket}/data/train",
        f"data.val_uri=s3://{s3_bucket}/data/val",
        f"train.storage_path=s3://{s3_bucket}/ckpt",
        "train.run_name=e2e",
        "train.epochs=6",
        "train.checkpoint_every_steps=2",
        "train.keep_checkpoints=20",
        f"mlflow.tracking_uri={mlflow_server.uri}",
        "mlflow.experiment=e2e",
        "registry.model_name=e2e-encoder",
    ]
    total = 24  # 64 images / 2 ranks / 8 = 4 steps × 6 epochs
    s3 = s3_server.client()

    def checkpoints() -> list[str]:
        found = s3.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/e2e/").get("Contents", [])
        return sorted(o["Key"] for o in found if o["Key"].endswith("/meta.json"))

    submitted = _job(local_cluster, "submit", "--no-wait", "--working-dir", str(ROOT), "--", "python",
                     "jobs/pretrain.py", *args)  # fmt: skip
    job_id = re.search(r"Job '([^']+)' submitted successfully", submitted)
    assert job_id, submitted
    deadline = time.monotonic() + 600
    while not checkpoints():
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        status = _job(local_cluster, "status", job_id[1])
        assert "RUNNING" in status or "PENDING" in status, status[-3000:]
        time.sleep(0.5)
    _job(local_cluster, "stop", job_id[1])
    status = _job(local_cluster, "status", job_id[1])
    assert f"Job '{job_id[1]}' was stopped" in status, status[-3000:]  # not finished before the stop took effect
    before = checkpoints()
    assert f"ckpt/e2e/step_{total:08d}/meta.json" not in before, before

    second = submit(local_cluster, "jobs/pretrain.py", *args)
    assert "continuing from step" in second.stdout + second.stderr
    # readable by default: the summary and the lookup command, no Ray worker lines or Ray Data plans (only with -v)
    assert "look it up:   MLFLOW_TRACKING_URI=" in second.stdout
    assert "(RayTrainWorker" not in second.stdout and "Execution plan" not in second.stdout, second.stdout[-4000:]
    assert f"ckpt/e2e/step_{total:08d}/meta.json" in checkpoints()
    client = mlflow.MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1, "the resubmitted job continues the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, total + 1)), sorted(steps)
    mv = client.get_model_version_by_alias("e2e-encoder", "current")
    assert mv.tags["steps"] == str(total) and mv.tags["checkpoint_uri"].startswith(f"s3://{s3_bucket}/ckpt/e2e/")


def test_sweep_job(local_cluster, s3_server, s3_bucket, mlflow_server):
    synthesize(
        f"s3://{s3_bucket}/data", num_images=120, image_size=32, classes=4, fmt="files", seed=1, val_fraction=0.33
    )
    submit(
        local_cluster,
        "jobs/sweep.py",
        "--config",
        "jobs/configs/sweep_demo.yaml",
        *TINY,
        f"data.train_uri=s3://{s3_bucket}/data/train",
        f"data.val_uri=s3://{s3_bucket}/data/val",
        f"train.storage_path=s3://{s3_bucket}/sweeps",
        "train.run_name=e2e-sweep",
        "train.epochs=2",
        "train.eval_every_steps=2",
        "tune.mask_ratios=[0.75]",
        "tune.decoder_embed_dims=[32, 64]",
        f"mlflow.tracking_uri={mlflow_server.uri}",
        "mlflow.experiment=e2e-sweep",
        "registry.model_name=e2e-sweep-encoder",
    )
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("e2e-sweep")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`mae.role` = 'sweep'")
    assert len(parents) == 1
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    assert len(children) == 2
    mv = client.get_model_version_by_alias("e2e-sweep-encoder", "best")
    assert mv.tags["sweep_run_id"] == parents[0].info.run_id
