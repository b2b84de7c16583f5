"""Checkpoints a reader can trust: meta.json written last with every file's size and sha256; incomplete ones are
passed over; a storage that refuses writes is named (issue 13). No Ray: real files on local folders."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from mae_service.config import ConfigError, build_config
from mae_service.train.checkpoint import (
    CheckpointMeta,
    CheckpointWriteError,
    latest_checkpoint,
    read_meta,
    save_checkpoint,
    step_dir_name,
    storage_failure,
)
from mae_service.train.schedule import make_optimizer
from mae_service.train.step import build_model
from tests.tiny import TINY_LOCAL

TINY = TINY_LOCAL


def _write(root, run, step, cfg):
    model = build_model(cfg)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    meta = CheckpointMeta(step=step, rows_per_rank=8 * step, config=cfg.to_dict(), model_args=dict(model.model_args))
    d = root / run / step_dir_name(step)
    save_checkpoint(d, model=model, optimizer=opt, scaler=None, meta=meta, config_yaml=cfg.to_yaml())
    return d


@pytest.fixture(scope="module")
def cfg():
    return build_config({}, TINY)


def test_meta_records_every_file_and_is_written_last(tmp_path, cfg):
    d = _write(tmp_path, "r", 4, cfg)
    meta = json.loads((d / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "state.pt", "config.yaml"}
    for name, rec in meta["files"].items():
        assert (d / name).stat().st_size == rec["bytes"] and len(rec["sha256"]) == 64
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "meta.json", "model.safetensors", "state.pt"]
    assert read_meta(d).step == 4


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, cfg, caplog):
    _write(tmp_path, "r", 4, cfg)
    latest = _write(tmp_path, "r", 8, cfg)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the disk filled up mid-write
    (tmp_path / "r" / step_dir_name(12)).mkdir()  # an upload that never got its meta.json
    (tmp_path / "r" / step_dir_name(12) / "model.safetensors").write_bytes(b"x")
    (tmp_path / "r" / step_dir_name(16)).mkdir()
    (tmp_path / "r" / step_dir_name(16) / "meta.json").write_text('{"step": 16')  # cut short

    with caplog.at_level(logging.WARNING, logger="mae_service.train.checkpoint"):
        found = latest_checkpoint(str(tmp_path), "r", None)
    assert found is not None
    path, _, meta = found
    assert meta.step == 4 and path.endswith(step_dir_name(4))
    text = caplog.text
    for step in (8, 12, 16):
        assert step_dir_name(step) in text, text
    assert "model.safetensors has" in text  # says which file is short


def test_same_size_corruption_is_caught_before_loading(tmp_path, cfg):
    d = _write(tmp_path, "r", 4, cfg)
    state = d / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"state\.pt.*truncated or modified"):
        read_meta(d)
    assert read_meta(d, verify=False).step == 4


def test_checkpoints_without_recorded_files_still_load(tmp_path, cfg):
    d = _write(tmp_path, "r", 4, cfg)
    meta = json.loads((d / "meta.json").read_text())
    del meta["files"]  # written before issue 13
    (d / "meta.json").write_text(json.dumps(meta))
    assert latest_checkpoint(str(tmp_path), "r", None)[2].step == 4
    assert read_meta(d).files is None


def test_an_unwritable_checkpoint_folder_is_named(tmp_path, cfg):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = _write(tmp_path, "r", 4, cfg)
    snapshot = {p.name: p.read_bytes() for p in before.iterdir()}
    with pytest.raises(CheckpointWriteError, match=rf"{blocker}/r/step_00000008.*intact"):
        _write(blocker, "r", 8, cfg)
    assert {p.name: p.read_bytes() for p in before.iterdir()} == snapshot


def test_storage_failures_from_workers_are_one_line_naming_the_path():
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("Training failed: a worker raised") from e
    except RuntimeError as e:
        line = storage_failure(e, "/data/ck")
    assert line is not None and "train.storage_path='/data/ck'" in line and "No space left" in line
    assert storage_failure(RuntimeError("[Errno 30] Read-only file system: '/mnt/ck/x'"), "/mnt/ck")
    assert storage_failure(RuntimeError("CUDA out of memory"), "/data/ck") is None


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from mae_service.data.synth import synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), num_images=20, image_size=32, classes=2, fmt="files", seed=0, val_fraction=0.2)
    return out / "train"


def _unwritable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = [blocker / "ck"]
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):  # root ignores the mode bits
        out.append(ro / "ck")
    return out


def test_unwritable_local_storage_is_refused_before_ray(tmp_path, images):
    import ray

    from mae_service.train.preflight import preflight

    for storage in _unwritable(tmp_path):
        cfg = build_config(
            {},
            [
                *TINY,
                f"data.train_uri={images}",
                f"train.storage_path={storage}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
        )
        with pytest.raises(ConfigError) as e:
            preflight(cfg)
        assert f"train.storage_path={str(storage)!r}" in str(e.value) and "writable" in str(e.value)
    assert not ray.is_initialized()


def test_writable_local_storage_passes_preflight(tmp_path, images):
    from mae_service.train.preflight import checkpoint_bytes, preflight

    cfg = build_config(
        {},
        [
            *TINY,
            f"data.train_uri={images}",
            f"train.storage_path={tmp_path / 'new' / 'ck'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    assert preflight(cfg).plan.total_steps >= 1
    assert not (tmp_path / "new").exists()  # preflight creates nothing
    assert 12 * 5_000_000 < checkpoint_bytes(cfg) < 12 * 10_000_000
    assert not [p for p in tmp_path.iterdir() if ".mae-write-test" in p.name]


def test_a_cut_short_ray_train_checkpoint_list_is_removed_not_trusted(tmp_path, caplog):
    """Ray Train rewrites its checkpoint list in place: a full disk leaves it empty, and Ray Train would then
    refuse to start the run again. The driver removes such a file (naming it) before Ray Train reads it."""
    import pyarrow.fs as pafs

    from mae_service.train.checkpoint import RAY_TRAIN_SNAPSHOT, drop_broken_run_state

    fs, run_dir = pafs.LocalFileSystem(), tmp_path / "r"
    assert not drop_broken_run_state(fs, str(run_dir))  # no run folder yet
    run_dir.mkdir()
    (run_dir / RAY_TRAIN_SNAPSHOT).write_text('{"checkpoints": []}')
    assert not drop_broken_run_state(fs, str(run_dir)) and (run_dir / RAY_TRAIN_SNAPSHOT).exists()
    for broken in (b"", b'{"checkpoints": [', b"\xff\xfe"):
        (run_dir / RAY_TRAIN_SNAPSHOT).write_bytes(broken)
        with caplog.at_level(logging.WARNING, logger="mae_service.train.checkpoint"):
            assert drop_broken_run_state(fs, str(run_dir))
        assert not (run_dir / RAY_TRAIN_SNAPSHOT).exists()
        assert RAY_TRAIN_SNAPSHOT in caplog.text
