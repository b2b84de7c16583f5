"""``mae-service eval knn`` (features on Ray Data, data on S3), ``jobs/evaluate.py`` and ``mae-service reconstruct``
against a registered encoder in an embedded registry; an alias that moves during an evaluation."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mae_service.cli import main
from mae_service.data import eval_dataset, open_source, synthesize
from mae_service.evaluation import extract_labelled_features, knn_top1
from mae_service.model import create_model
from mae_service.model.precision import amp_name, resolve_amp
from mae_service.tracking import describe, evaluate_model, promote, register_encoder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_server, ray_local):
    root = tmp_path_factory.mktemp("eval")
    bucket = s3_server.make_bucket("registry-eval")
    data = f"s3://{bucket}/synth"
    counts = synthesize(data, num_images=60, image_size=32, classes=3, val_fraction=0.25, seed=1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # the embedded store's artifacts (./mlruns) stay in tmp
    try:
        torch.manual_seed(0)
        model = create_model(
            "mae_vit_tiny_patch16", img_size=32, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4
        ).eval()
        reg = register_encoder(
            model, tracking_uri=uri, model_name="eval-encoder", alias="current", run_id=None, tags={"data_uri": data}
        )
        yield {"uri": uri, "data": data, "counts": counts, "model": model, "reg": reg, "root": root}
    finally:
        os.chdir(cwd)


@pytest.fixture
def quiet_env(monkeypatch):
    """The CLI sets some MLflow env defaults; undo them after each test."""
    for key in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    ):
        old = os.environ.get(key)
        monkeypatch.setenv(key, old or "")
        if old is None:
            monkeypatch.delenv(key)


def test_eval_knn_cli_scores_records_and_matches_local_features(setup, capsys, quiet_env):
    uri, data = setup["uri"], setup["data"]
    rc = main(
        [
            "eval",
            "knn",
            "--model",
            "models:/eval-encoder@current",
            "--train-data",
            f"{data}/train",
            "--val-data",
            f"{data}/val",
            "--tracking-uri",
            uri,
            "--k",
            "5",
            "--random-baseline",
            "--json",
        ]
    )
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_train"] == setup["counts"]["train"] and metrics["num_val"] == setup["counts"]["val"]
    for key in ("knn_top1", "linear_probe_top1", "knn_top1_random_init", "linear_probe_top1_random_init"):
        assert 0.0 <= metrics[key] <= 1.0, key

    # the Ray Data actors computed the same features as a local pass over the same dataset (both under --amp auto)
    src_t, src_v = open_source(f"{data}/train", "files"), open_source(f"{data}/val", "files")
    amp = resolve_amp("auto", "cpu")
    xt, yt = extract_labelled_features(
        setup["model"], eval_dataset(src_t, image_size=32).iter_batches(batch_format="numpy"), dtype=amp
    )
    xv, yv = extract_labelled_features(
        setup["model"], eval_dataset(src_v, image_size=32).iter_batches(batch_format="numpy"), dtype=amp
    )
    assert sorted(set(yt.tolist())) == [0, 1, 2]
    assert metrics["knn_top1"] == pytest.approx(knn_top1(xt, yt, xv, yv, k=5))

    # recorded: tags on the version and an MLflow run
    tags = describe("models:/eval-encoder/1", tracking_uri=uri)["tags"]
    assert float(tags["eval.knn_top1"]) == pytest.approx(metrics["knn_top1"], abs=1e-6)
    import mlflow

    run = mlflow.MlflowClient(uri).get_run(tags["eval.run_id"])
    assert run.data.params["train_data"] == f"{data}/train" and run.data.params["model_uri"] == "models:/eval-encoder/1"
    assert run.data.params["amp"] == amp_name(amp)
    assert run.data.metrics["knn_top1_random_init"] == pytest.approx(metrics["knn_top1_random_init"])


def test_jobs_evaluate_takes_a_config_and_overrides(setup, tmp_path, capsys, quiet_env, monkeypatch):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"data:\n  train_uri: {setup['data']}/train\n  val_uri: {setup['data']}/val\n  image_size: 32\n"
        f"model:\n  name: mae_vit_tiny_patch16\nmlflow:\n  tracking_uri: {setup['uri']}\n"
        "registry:\n  model_name: eval-encoder\n  alias: current\n"
    )
    monkeypatch.setattr(
        sys,
        "argv",
        ["jobs/evaluate.py", "--config", str(cfg), "train.knn_k=3", "--no-linear-probe", "--no-record", "--json"],
    )
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "jobs" / "evaluate.py"), run_name="__main__")
    assert done.value.code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"knn_top1", "num_train", "num_val"} and "linear_probe_top1" not in metrics

    monkeypatch.setattr(sys, "argv", ["jobs/evaluate.py", "--config", str(cfg), "data.val_uri=null"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "jobs" / "evaluate.py"), run_name="__main__")
    assert done.value.code == 2 and "--val-data" in capsys.readouterr().err


def test_reconstruct_writes_a_png_grid(setup, tmp_path, capsys, quiet_env):
    out = tmp_path / "recon.png"
    rc = main(
        [
            "reconstruct",
            "--model",
            "models:/eval-encoder@current",
            "--data",
            f"{setup['data']}/val",
            "--out",
            str(out),
            "--num-images",
            "3",
            "--tracking-uri",
            setup["uri"],
        ]
    )
    assert rc == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (4 * 32, 3 * 32 + 2 * 2)  # 4 panels wide, 3 rows + separators
    assert (
        main(
            [
                "reconstruct",
                "--model",
                "models:/eval-encoder@current",
                "--data",
                f"{setup['data']}/val",
                "--out",
                str(tmp_path / "x.jpg"),
                "--tracking-uri",
                setup["uri"],
            ]
        )
        == 2
    )


def test_evaluation_is_recorded_on_the_scored_version_when_the_alias_moves(setup, monkeypatch):
    """The alias is resolved once: moving it while the encoder loads must not put v1's score on v2."""
    from mae_service.tracking import evaluations

    uri, data, name = setup["uri"], setup["data"], "moving-encoder"
    first = create_model(
        "mae_vit_tiny_patch16", img_size=32, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4
    ).eval()
    v1 = register_encoder(first, tracking_uri=uri, model_name=name, alias="current", run_id=None, tags={})
    v2 = register_encoder(setup["model"], tracking_uri=uri, model_name=name, alias="next", run_id=None, tags={})
    promote(name, v1.version, "current", tracking_uri=uri)
    real_load = evaluations.load_encoder
    loaded: list[str] = []

    def load_then_move_alias(model_uri, *, tracking_uri=None):
        encoder = real_load(model_uri, tracking_uri=tracking_uri)
        loaded.append(model_uri)
        promote(name, v2.version, "current", tracking_uri=tracking_uri)  # someone promotes v2 meanwhile
        return encoder

    monkeypatch.setattr(evaluations, "load_encoder", load_then_move_alias)
    metrics = evaluate_model(
        f"models:/{name}@current", f"{data}/train", f"{data}/val", k=5, linear_probe=False, tracking_uri=uri
    )
    assert loaded == [f"models:/{name}/{v1.version}"]  # the pinned version is what was loaded
    assert describe(f"models:/{name}@current", tracking_uri=uri)["version"] == v2.version  # the alias did move
    tags_v1 = describe(f"models:/{name}/{v1.version}", tracking_uri=uri)["tags"]
    tags_v2 = describe(f"models:/{name}/{v2.version}", tracking_uri=uri)["tags"]
    assert float(tags_v1["eval.knn_top1"]) == pytest.approx(metrics["knn_top1"], abs=1e-6)
    assert not any(k.startswith("eval.") for k in tags_v2), tags_v2
    import mlflow

    run = mlflow.MlflowClient(uri).get_run(tags_v1["eval.run_id"])
    assert run.data.params["model_uri"] == f"models:/{name}/{v1.version}"
    assert run.data.tags["mae_service.asked_uri"] == f"models:/{name}@current"
