"""Rank 0's MLflow records and their spool (issue 13, defect 1), without Ray or servers: the spool file beside the
checkpoints round-trips every kind of record, metric records are joined into MLflow-sized batches, failures are
sorted into "retry later" and "refused for good", and MLflow's HTTP settings get bounded defaults without
overriding the user's."""

from __future__ import annotations

import math
import os

import pytest

from mae_service.train.run_logger import (
    HTTP_DEFAULTS,
    MAX_METRICS_PER_BATCH,
    _chunks,
    bounded_http,
    deliver_all,
    is_transient,
    metrics_record,
    picture_record,
    tag_record,
)
from mae_service.train.spool import SPOOL_FILE, Spool


def test_spool_round_trips_records_and_is_deleted_when_empty(tmp_path):
    spool = Spool(str(tmp_path / "ck"), "run-a")
    assert spool.read() == [] and spool.uri == str(tmp_path / "ck" / "run-a" / SPOOL_FILE)
    records = [
        metrics_record("r1", {"loss": float("nan"), "lr": 1e-3}, 7, ts=1000),
        picture_record("r1", "reconstructions/step_00000007.png", b"\x89PNG\r\n\x1a\nxyz"),
        tag_record("r1", "mae.checkpoint_uri", "s3://b/ck/run-a/step_00000007"),
    ]
    spool.write(records)
    back = spool.read()
    assert [r["kind"] for r in back] == ["metrics", "picture", "tag"]
    assert math.isnan(back[0]["values"]["loss"]) and back[0]["values"]["lr"] == 1e-3 and back[0]["step"] == 7
    assert back[1:] == records[1:]
    assert not list((tmp_path / "ck" / "run-a").glob(".*tmp"))  # renamed into place
    spool.write([])
    assert not (tmp_path / "ck" / "run-a" / SPOOL_FILE).exists()


def test_spool_skips_lines_that_are_not_records(tmp_path, caplog):
    spool = Spool(str(tmp_path), "r")
    spool.write([tag_record("r1", "k", "v")])
    path = tmp_path / "r" / SPOOL_FILE
    path.write_text(path.read_text() + '{"kind": "metrics", "run_id": "r1", "st\n[1, 2]\n')  # cut short, not a record
    assert spool.read() == [tag_record("r1", "k", "v")]
    assert "line 2 is not a record" in caplog.text and "line 3 is not a record" in caplog.text


def test_metric_records_are_joined_up_to_mlflow_batch_limit():
    per = MAX_METRICS_PER_BATCH // 2 - 1
    m = [metrics_record("a", {f"k{i}": 1.0 for i in range(per)}, s) for s in range(3)]
    records = [m[0], m[1], m[2], tag_record("a", "t", "v"), metrics_record("b", {"x": 1}, 1), metrics_record("a", {"x": 1}, 2)]  # fmt: skip
    chunks = list(_chunks(records))
    assert [len(c) for c in chunks] == [2, 1, 1, 1, 1]  # the limit, a tag alone, another run, then run a again
    assert sum(len(r["values"]) for r in chunks[0]) <= MAX_METRICS_PER_BATCH


def test_failures_are_sorted_into_transient_and_refused():
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    assert is_transient(MlflowException("API request failed: connection refused"))  # INTERNAL_ERROR: 500
    assert is_transient(MlflowException("slow down", error_code=codes.REQUEST_LIMIT_EXCEEDED))
    assert is_transient(MlflowException("who are you", error_code=codes.UNAUTHENTICATED))
    assert is_transient(OSError("network unreachable"))
    assert not is_transient(MlflowException("bad value", error_code=codes.INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("no such run", error_code=codes.RESOURCE_DOES_NOT_EXIST))


def test_a_refused_record_is_dropped_and_the_rest_delivered(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    records = [
        metrics_record(run_id, {"loss": 1.0}, 1),
        metrics_record("no-such-run", {"loss": 2.0}, 2),  # refused for good (RESOURCE_DOES_NOT_EXIST)
        metrics_record(run_id, {"loss": 3.0}, 3),
        tag_record(run_id, "k", "v"),
    ]
    assert deliver_all(client, records) == []
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 3]
    assert client.get_run(run_id).data.tags["k"] == "v"


def test_bounded_http_defaults_keep_the_users_settings(monkeypatch):
    keys = list(HTTP_DEFAULTS)
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(keys[0], "9")
    with bounded_http():
        assert os.environ[keys[0]] == "9"  # the user's own value
        assert all(os.environ[k] == HTTP_DEFAULTS[k] for k in keys[1:])
    assert os.environ[keys[0]] == "9" and not any(k in os.environ for k in keys[1:])


@pytest.mark.parametrize("storage", ["relative/ck", "s3://bucket/prefix/"])
def test_spool_uri_names_the_run_folder(storage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = Spool(storage, "run-b").uri
    if storage.startswith("s3://"):
        assert uri == f"s3://bucket/prefix/run-b/{SPOOL_FILE}"
    else:
        assert uri == str(tmp_path / "relative" / "ck" / "run-b" / SPOOL_FILE)


def test_steps_already_recorded_are_not_sent_again(tmp_path):
    """A resubmit after a lost driver: steps up to ``recorded_through`` (in MLflow already) are dropped, later ones
    sent; into a real SQLite store."""
    import mlflow

    from mae_service.train.run_logger import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("recorded")).info.run_id
    for step in (1, 2, 3):  # what the killed submission recorded
        client.log_metric(run_id, "loss", 1.0 / step, step=step)
    logger = RunLogger(uri, run_id, system_metrics=False, recorded_through=3)
    for step in range(2, 7):  # re-trained from the step-1 checkpoint: 2 and 3 again, then new steps
        logger.metrics({"loss": 10.0 + step}, step)
    assert logger.close() == 0
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_a_fresh_run_records_step_zero(tmp_path):
    """Nothing recorded yet (the default): a metric at step 0 (fine-tuning's evaluation before training) is sent."""
    import mlflow

    from mae_service.train.driver import recorded_through
    from mae_service.train.run_logger import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("fresh")).info.run_id
    assert recorded_through(uri, run_id) == -1
    logger = RunLogger(uri, run_id, system_metrics=False)
    for step in (0, 1):
        logger.metrics({"val_top1": 0.5 + step / 10}, step)
    assert logger.close() == 0
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_top1")) == [0, 1]
