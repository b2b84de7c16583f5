"""A wrong start fails in seconds with every problem named, before Ray starts (own module: no ``ray_local`` here)."""

from __future__ import annotations

import time

import pytest

from mae_service.config import build_config
from mae_service.train.driver import pretrain
from tests.integration.test_train import TINY


def test_bad_start_names_every_problem_before_any_cluster_work(s3_server, tmp_path):
    from mae_service.config import ConfigError
    from tests.servers import free_port

    cfg = build_config(
        {},
        [
            *TINY,
            "data.train_uri=s3://no-such-bucket/train",
            f"data.val_uri={tmp_path / 'none'}",
            f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
            "train.storage_path=s3://no-such-bucket-either/ck",
        ],
    )
    import ray

    ray_was_up = ray.is_initialized()
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        pretrain(cfg)
    assert time.monotonic() - t0 < 60
    text = str(e.value)
    for needle in ("s3://no-such-bucket/train", str(tmp_path / "none"), "mlflow.tracking_uri", "no-such-bucket-either"):
        assert needle in text, text
    assert ray.is_initialized() == ray_was_up  # no Ray started for a job that cannot run
