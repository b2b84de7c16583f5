"""What the exact-resume tests compare: a run's MLflow metric history by step, and the tensors of a checkpoint's
``model.safetensors`` (local folder or ``s3://``), bit for bit."""

from __future__ import annotations

from pathlib import Path

import mlflow


def metric_history(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    """``{step: value}`` of metric ``key`` of run ``run_id`` (a step logged twice keeps the last value read)."""
    client = mlflow.MlflowClient(tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def metric_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    """Every step of metric ``key``'s history, repeats included, sorted."""
    return sorted(m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, key))


def checkpoint_tensors(checkpoint: str | Path, s3_client=None) -> dict:
    """The tensors of ``checkpoint``/model.safetensors (``s3://bucket/key`` needs ``s3_client``)."""
    from safetensors.torch import load

    uri = str(checkpoint).rstrip("/") + "/model.safetensors"
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        data = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        data = Path(uri).read_bytes()
    return load(data)


def assert_bit_equal(a: dict, b: dict) -> None:
    """The same tensor names, dtypes, shapes and bits."""
    import torch

    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"
