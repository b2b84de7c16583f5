"""Pretraining on a local Ray with two CPU workers: loss falls, MLflow records, resume is exact (under the default
``train.amp=auto``: bf16 on CPUs that have it), a SIGKILLed worker is recovered from its last checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import psutil
import pytest

from mae_service.config import build_config
from mae_service.data.synth import synthesize
from mae_service.train.driver import pretrain
from tests.exact import metric_history
from tests.tiny import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "train.num_workers=2",
    "train.batch_size=16",
    "data.shard_size=16",
    "train.warmup_epochs=1",
    "mlflow.log_system_metrics=false",
]


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), num_images=64, image_size=32, classes=4, fmt="files", seed=1, val_fraction=0.25)
    return out


def test_pretrain_on_s3_with_mlflow_server(ray_local, s3_server, s3_bucket, mlflow_server, experiment_name):
    synthesize(
        f"s3://{s3_bucket}/data", num_images=96, image_size=32, classes=4, fmt="files", seed=0, val_fraction=0.25
    )
    cfg = build_config(
        {},
        [
            *TINY,
            f"data.train_uri=s3://{s3_bucket}/data/train",
            f"data.val_uri=s3://{s3_bucket}/data/val",
            f"train.storage_path=s3://{s3_bucket}/ckpt",
            "train.run_name=s3run",
            "train.epochs=6",
            "train.lr=2e-3",
            "train.checkpoint_every_steps=12",
            "train.picture_every_steps=12",
            f"mlflow.tracking_uri={mlflow_server.uri}",
            f"mlflow.experiment={experiment_name}",
            "mlflow.log_system_metrics=true",
        ],
    )
    result = pretrain(cfg)
    assert result.step == 24  # 72 train images / 2 ranks → 32 rows (4 micro-batches of 8) per rank per epoch × 6

    loss = metric_history(mlflow_server.uri, result.mlflow_run_id, "loss")
    assert sorted(loss) == list(range(1, 25))
    first, last = [loss[s] for s in range(1, 5)], [loss[s] for s in range(21, 25)]
    assert sum(last) / 4 < 0.9 * sum(first) / 4, loss
    for key in ("lr", "images_per_s", "data_wait_frac", "knn_top1"):
        assert metric_history(mlflow_server.uri, result.mlflow_run_id, key), key

    client = mlflow.MlflowClient(mlflow_server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["model.mask_ratio"] == "0.75" and run.data.params["train.batch_size"] == "16"
    assert run.info.status == "FINISHED"
    # system metrics: whatever the run's length, rank 0 logs a last sample at the final step when it closes
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, sorted(run.data.metrics)
    assert 24 in {m.step for m in client.get_metric_history(result.mlflow_run_id, system[0])}
    pictures = [f.path for f in client.list_artifacts(result.mlflow_run_id, "reconstructions")]
    assert "reconstructions/step_00000012.png" in pictures and "reconstructions/step_00000024.png" in pictures

    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/s3run/")["Contents"]]
    assert f"ckpt/s3run/{'step_00000024'}/model.safetensors" in keys
    assert result.checkpoint_uri == f"s3://{s3_bucket}/ckpt/s3run/step_00000024"


def _cfg(local_data, tmp_path, name, *extra):
    return build_config(
        {},
        [
            *TINY,
            f"data.train_uri={local_data / 'train'}",
            f"train.storage_path={tmp_path / 'ck'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"train.run_name={name}",
            "train.epochs=4",
            "train.lr=1e-3",
            "train.checkpoint_every_steps=4",
            "registry.register=false",
            *extra,
        ],
    )


def test_resumed_run_reproduces_the_uninterrupted_run(ray_local, local_data, tmp_path):
    full = pretrain(_cfg(local_data, tmp_path, "full"))
    assert full.step == 12  # 48 train images / 2 ranks = 24 rows = 3 steps of 8 per epoch × 4
    part = pretrain(_cfg(local_data, tmp_path, "resumed", "train.max_steps=4"))
    assert part.step == 4
    rest = pretrain(_cfg(local_data, tmp_path, "resumed"))
    assert rest.step == 12 and rest.mlflow_run_id == part.mlflow_run_id  # the same MLflow run continues

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = metric_history(uri, full.mlflow_run_id, "loss")
    b = metric_history(uri, rest.mlflow_run_id, "loss")
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])
    # train.amp=auto (the default): what it resolved to is recorded, by the driver and by rank 0
    from mae_service.model.precision import amp_name, resolve_amp

    run = mlflow.MlflowClient(uri).get_run(rest.mlflow_run_id)
    expected = amp_name(resolve_amp("auto", "cpu"))
    assert run.data.params["train.amp"] == "auto" and run.data.params["train.amp_resolved"] == expected
    assert run.data.tags["mae.amp_worker"].startswith(f"{expected} on this CPU")


def test_changed_settings_do_not_overwrite_a_run(ray_local, local_data, tmp_path):
    pretrain(_cfg(local_data, tmp_path, "guarded", "train.max_steps=4"))
    with pytest.raises(ValueError, match="model.mask_ratio"):
        pretrain(_cfg(local_data, tmp_path, "guarded", "model.mask_ratio=0.5"))
    assert (tmp_path / "ck" / "guarded" / "step_00000004" / "model.safetensors").is_file()


def test_sigkilled_worker_is_recovered(ray_local, local_data, tmp_path):
    cfg = _cfg(
        local_data, tmp_path, "killed", "train.epochs=6", "train.max_failures=2", "train.checkpoint_every_steps=3"
    )
    out: dict = {}

    def run():
        try:
            out["result"] = pretrain(cfg)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    first_ckpt = tmp_path / "ck" / "killed" / "step_00000003"
    deadline = time.monotonic() + 300
    while not first_ckpt.exists() and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_ckpt.exists(), out
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
    ]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    th.join(600)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.step == 18
    assert (tmp_path / "ck" / "killed" / "step_00000018" / "model.safetensors").is_file()
    loss = metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}", result.mlflow_run_id, "loss")
    assert sorted(loss) == list(range(1, 19))
    assert time.monotonic() > killed_at
