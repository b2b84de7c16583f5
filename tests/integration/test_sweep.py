"""A Ray Tune sweep on local Ray: ≥ 4 trials over two mask ratios and two decoder widths, ASHA, MLflow parent and
child runs, the best encoder registered and loadable by alias."""

from __future__ import annotations

import mlflow
import pytest

from mae_service.config import ConfigError, build_config
from mae_service.data.synth import synthesize
from mae_service.tune.sweep import sweep

SWEEP = [
    "model.name=mae_vit_tiny_patch16",
    "data.image_size=32",
    "model.patch_size=8",
    "model.decoder_depth=1",
    "model.decoder_num_heads=4",
    "train.num_workers=1",
    "train.batch_size=16",
    "data.shard_size=16",
    "train.epochs=2",
    "train.warmup_epochs=1",
    "train.lr=1e-3",
    "train.eval_every_steps=2",
    "train.checkpoint_every_steps=1000",
    "tune.mask_ratios=[0.5, 0.75]",
    "tune.decoder_embed_dims=[32, 64]",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
    "mlflow.log_system_metrics=false",
    "train.run_name=sw",
    "registry.model_name=sweep-encoder",
]


def test_sweep_tracks_trials_and_registers_the_best(ray_local, tmp_path):
    synthesize(str(tmp_path / "data"), num_images=120, image_size=32, classes=4, fmt="files", seed=3, val_fraction=0.33)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config(
        {},
        [
            *SWEEP,
            f"data.train_uri={tmp_path / 'data' / 'train'}",
            f"data.val_uri={tmp_path / 'data' / 'val'}",
            f"train.storage_path={tmp_path / 'st'}",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=sweep-test",
        ],
    )
    result = sweep(cfg)

    assert len(result.table) == 4 and not any(r["error"] for r in result.table)
    assert {(r["mask_ratio"], r["decoder_embed_dim"]) for r in result.table} == {
        (0.5, 32),
        (0.5, 64),
        (0.75, 32),
        (0.75, 64),
    }
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in result.table)
    assert any(r["stopped_early"] for r in result.table), result.table  # ASHA cut at least one trial short
    assert max(r["step"] for r in result.table) == 10  # 80 train images / batch 16 × 2 epochs

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert len(children) == 4
    assert all(c.data.params["model.mask_ratio"] in ("0.5", "0.75") for c in children)
    assert all("knn_top1" in c.data.metrics for c in children)
    parent_files = [f.path for f in client.list_artifacts(result.parent_run_id, "sweep")]
    assert "sweep/results.csv" in parent_files and "sweep/objective.png" in parent_files

    mv = result.model_version
    assert mv is not None and mv.alias == "best"
    assert client.get_model_version_by_alias("sweep-encoder", "best").tags["trial"] == result.best["run_name"]
    from mae_service.tracking import load_encoder

    enc = load_encoder("models:/sweep-encoder@best", tracking_uri=uri)
    assert enc.patch_embed.proj.weight.shape[-1] == 8


def test_bad_search_space_fails_before_any_trial(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config({}, [*SWEEP, "tune.mask_ratios=[0.5, 1.2]", "tune.decoder_embed_dims=[30]"])
    assert "1.2" in str(e.value) and "30" in str(e.value)
    with pytest.raises(ConfigError, match="tune.mask_ratios is empty"):
        build_config({}, [*SWEEP, "tune.mask_ratios=[]"])


def test_sweep_larger_than_cluster_is_refused(ray_local, tmp_path):
    synthesize(str(tmp_path / "data"), num_images=200, image_size=32, classes=4, fmt="files", seed=3, val_fraction=0.25)
    cfg = build_config(
        {},
        [
            *SWEEP,
            f"data.train_uri={tmp_path / 'data' / 'train'}",
            f"data.val_uri={tmp_path / 'data' / 'val'}",
            f"train.storage_path={tmp_path / 'st'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.num_workers=8",
            "train.batch_size=64",
        ],
    )
    with pytest.raises(ConfigError, match="the cluster has 4"):
        sweep(cfg)
    assert not (tmp_path / "st").exists()
