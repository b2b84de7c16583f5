"""Credentials and unsafe deserialisation (issue 13): a credentialed tracking URI leaves its user and password in
MLflow's auth variables only; the package never unpickles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mae_service.config import build_config
from mae_service.config.fields import AUTH_ENV, split_credentials

PACKAGE = Path(__file__).resolve().parents[2] / "mae_service"


@pytest.fixture(autouse=True)
def _no_auth_env(monkeypatch):
    for key in AUTH_ENV:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@pytest.mark.parametrize(
    "uri, clean, user, password",
    [
        ("http://ann:s3cret@host:5000", "http://host:5000", "ann", "s3cret"),
        ("https://ann:p%40ss%3Aw@mlflow.example.com/x", "https://mlflow.example.com/x", "ann", "p@ss:w"),
        ("http://token@host", "http://host", "token", None),
        ("http://host:5000", "http://host:5000", None, None),
        ("postgresql://u:p@db/mlflow", "postgresql://u:p@db/mlflow", None, None),  # SQLAlchemy reads them there
    ],
)
def test_split_credentials(uri, clean, user, password):
    assert split_credentials(uri) == (clean, user, password)


def test_config_moves_credentials_to_mlflows_auth_variables(tmp_path, monkeypatch):
    import os

    from mae_service.train.checkpoint import CheckpointMeta, save_checkpoint
    from mae_service.train.driver import config_yaml
    from mae_service.train.schedule import make_optimizer
    from mae_service.train.step import build_model
    from mae_service.train.trainer import worker_env

    cfg = build_config(
        {},
        [
            "mlflow.tracking_uri=http://ann:Very-s3cret-42@127.0.0.1:5000",
            "model.name=mae_vit_tiny_patch16",
            "data.image_size=32",
            "model.patch_size=8",
            "model.decoder_embed_dim=32",
            "model.decoder_depth=1",
            "model.decoder_num_heads=4",
        ],
    )
    assert cfg.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ann", "Very-s3cret-42")
    assert worker_env() == {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "Very-s3cret-42"}
    assert "Very-s3cret-42" not in str(cfg.flat()) + cfg.to_yaml() + config_yaml(cfg)

    # a checkpoint's meta scrubs any URI credentials that reach it (e.g. a data URI with user-info)
    d = cfg.to_dict()
    d["data"]["train_uri"] = "https://bob:Other-s3cret-7@files.example.com/train"
    model = build_model(cfg)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    meta = CheckpointMeta(step=1, rows_per_rank=1, config=d, model_args=dict(model.model_args))
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scaler=None, meta=meta)
    text = (tmp_path / "ck" / "meta.json").read_text()
    assert "Other-s3cret-7" not in text and "Very-s3cret-42" not in text and "files.example.com/train" in text


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _call(text: str, start: int) -> str:
    """The call starting at ``text[start]`` up to its matching closing parenthesis."""
    depth, i = 0, text.index("(", start)
    while i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            break
        i += 1
    return text[start : i + 1]


def test_no_torch_load_without_weights_only():
    bad = []
    for path in _sources():
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = _call(text, m.start())
            if "weights_only=True" not in call:
                bad.append(f"{path.relative_to(PACKAGE.parent)}: {call}")
    assert not bad, bad


def test_nothing_imports_pickle():
    bad = [
        str(path.relative_to(PACKAGE.parent))
        for path in _sources()
        if re.search(
            r"^\s*(import (c?pickle|dill|joblib)\b|from (c?pickle|dill|joblib) import)", path.read_text(), re.M
        )
    ]
    assert not bad, bad
