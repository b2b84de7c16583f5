"""A resubmitted run that already trained all its steps (issue 13, defect 3): no Ray starts, the final checkpoint is
registered under the new job's alias, and the MLflow run is closed FINISHED, not left RUNNING."""

from __future__ import annotations

import mlflow
import pytest

from mae_service.config import build_config
from mae_service.data.synth import synthesize
from mae_service.train.checkpoint import CheckpointMeta, read_meta, save_checkpoint, step_dir_name
from mae_service.train.driver import open_mlflow_run, pretrain
from mae_service.train.preflight import preflight
from mae_service.train.schedule import make_optimizer
from mae_service.train.step import build_model
from tests.tiny import TINY_LOCAL as TINY


@pytest.fixture
def finished_run(tmp_path):
    """A run whose last checkpoint is at its final step (as a completed ``pretrain`` leaves it)."""
    synthesize(str(tmp_path / "data"), num_images=20, image_size=32, classes=2, fmt="files", seed=0, val_fraction=0.2)

    def cfg(*extra):
        return build_config(
            {},
            [
                *TINY,
                f"data.train_uri={tmp_path / 'data' / 'train'}",
                f"train.storage_path={tmp_path / 'ck'}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "mlflow.experiment=resubmit",
                "mlflow.log_system_metrics=false",
                "train.run_name=done",
                "registry.model_name=resubmit-enc",
                *extra,
            ],
        )

    first = cfg("registry.alias=first")
    steps = preflight(first).plan.total_steps
    run_id = open_mlflow_run(first, "done", None)
    mlflow.MlflowClient(first.mlflow.tracking_uri).set_terminated(run_id, status="FINISHED")
    model = build_model(first)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    meta = CheckpointMeta(
        step=steps,
        rows_per_rank=8 * steps,
        config=first.to_dict(),
        model_args=dict(model.model_args),
        mlflow_run_id=run_id,
        loss=0.5,
    )
    save_checkpoint(tmp_path / "ck" / "done" / step_dir_name(steps), model=model, optimizer=opt, scaler=None, meta=meta)
    return cfg, run_id, steps


def test_resubmitted_finished_run_registers_with_the_new_alias_and_finishes(finished_run):
    import ray

    cfg, run_id, steps = finished_run
    again = cfg("registry.alias=second")
    result = pretrain(again)
    assert not ray.is_initialized()  # nothing to train: no cluster work
    assert result.mlflow_run_id == run_id and result.step == steps
    assert result.model_version is not None and result.model_version.alias == "second"
    client = mlflow.MlflowClient(again.mlflow.tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    mv = client.get_model_version_by_alias("resubmit-enc", "second")
    assert mv.tags["steps"] == str(steps) and mv.tags["source_run"] == run_id
    assert mv.tags["checkpoint_uri"].endswith(step_dir_name(steps))


def test_resubmitted_finished_run_without_registration_still_finishes(finished_run):
    cfg, run_id, _ = finished_run
    result = pretrain(cfg("registry.register=false"))
    assert result.model_version is None
    assert mlflow.MlflowClient(cfg().mlflow.tracking_uri).get_run(run_id).info.status == "FINISHED"


def test_resubmit_after_a_registration_cut_short_reuses_its_version(finished_run):
    """The tracking server lost after ``create_model_version``, before the alias was set and the run closed: the
    resubmit finds the version made from the same run, checkpoint and weights, points the alias at it and closes
    the run; a later resubmit with another alias also points at that version. One version in all."""
    cfg, run_id, steps = finished_run
    first = pretrain(cfg("registry.alias=first"))
    version = first.model_version.version
    client = mlflow.MlflowClient(cfg().mlflow.tracking_uri)
    client.delete_registered_model_alias("resubmit-enc", "first")  # what the lost server never got
    client.update_run(run_id, status="RUNNING")

    again = pretrain(cfg("registry.alias=first"))
    assert again.model_version.version == version
    assert [int(v.version) for v in client.search_model_versions("name = 'resubmit-enc'")] == [version]
    assert int(client.get_model_version_by_alias("resubmit-enc", "first").version) == version
    assert client.get_run(run_id).info.status == "FINISHED"
    assert again.model_version.weights_sha256 == first.model_version.weights_sha256

    other = pretrain(cfg("registry.alias=second"))
    assert other.model_version.version == version
    assert [int(v.version) for v in client.search_model_versions("name = 'resubmit-enc'")] == [version]
    assert client.get_registered_model("resubmit-enc").aliases == {"first": version, "second": version}


def test_other_weights_of_the_same_run_get_a_new_version(finished_run, tmp_path):
    """Idempotent for the same weights only: the run's final checkpoint rewritten with other weights (same step,
    same folder) is registered as a new version."""
    import shutil

    import torch

    cfg, run_id, steps = finished_run
    first = pretrain(cfg("registry.alias=first"))
    folder = tmp_path / "ck" / "done" / step_dir_name(steps)
    meta = read_meta(folder)
    model = build_model(cfg())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    shutil.rmtree(folder)
    save_checkpoint(folder, model=model, optimizer=opt, scaler=None, meta=meta)
    again = pretrain(cfg("registry.alias=first"))
    assert again.model_version.version == first.model_version.version + 1
    assert again.model_version.weights_sha256 != first.model_version.weights_sha256
    client = mlflow.MlflowClient(cfg().mlflow.tracking_uri)
    assert int(client.get_model_version_by_alias("resubmit-enc", "first").version) == again.model_version.version
