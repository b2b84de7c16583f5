from pathlib import Path

import pytest

from mae_service.config import ConfigError, build_config, dump_yaml, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


def test_every_shipped_config_loads():
    assert CONFIGS, "no shipped configs found"
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.train.batch_size % cfg.train.num_workers == 0
        assert cfg.micro_batch * cfg.accum_steps * cfg.train.num_workers == cfg.train.batch_size


@pytest.mark.parametrize("path", [p for p in CONFIGS if "paper" in p.name], ids=lambda p: p.name)
def test_paper_recipes(path):
    cfg = load_config(path)
    assert cfg.train.batch_size == 4096 and cfg.train.blr == 1.5e-4 and cfg.train.epochs == 800
    assert cfg.train.warmup_epochs == 40 and cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75
    assert cfg.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert tuple(cfg.train.betas) == (0.9, 0.95) and cfg.train.weight_decay == 0.05
    assert cfg.train.use_gpu and cfg.train.amp == "bf16"


def test_overrides_are_typed():
    cfg = build_config({}, ["model.mask_ratio=0.6", "train.use_gpu=false", "train.epochs=3", "data.val_uri=null",
                            "tune.mask_ratios=[0.5, 0.9]", "train.betas=[0.9, 0.99]"])
    assert cfg.model.mask_ratio == 0.6 and cfg.train.epochs == 3 and cfg.data.val_uri is None
    assert cfg.tune.mask_ratios == [0.5, 0.9] and cfg.train.betas == (0.9, 0.99)


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        build_config({}, ["model.mask_ratio=1.0", "data.image_size=225", "train.batch_size=9", "train.num_workers=2",
                          "model.decoder_embed_dim=100", "data.format=zip", "train.epochs=two"])
    text = str(e.value)
    assert "train.epochs='two'" in text  # type errors are reported first, on their own
    with pytest.raises(ConfigError) as e:
        build_config({}, ["model.mask_ratio=1.0", "data.image_size=225", "train.batch_size=9", "train.num_workers=2",
                          "model.decoder_embed_dim=100", "data.format=zip"])
    text = str(e.value)
    for needle in ("model.mask_ratio=1.0", "225", "train.batch_size=9", "decoder_embed_dim=100", "data.format='zip'"):
        assert needle in text, needle
    assert len(e.value.problems) == 5


def test_unknown_keys_and_sections():
    with pytest.raises(ConfigError, match="unknown key model.mask"):
        build_config({"model": {"mask": 0.5}})
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        build_config({"trian": {}})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config({}, ["model.mask_ratio"])


def test_unknown_model_lists_allowed():
    with pytest.raises(ConfigError, match="mae_vit_base_patch16"):
        build_config({}, ["model.name=resnet50"])


def test_file_store_is_refused():
    with pytest.raises(ConfigError, match="MLflow 3"):
        build_config({}, ["mlflow.tracking_uri=file:///tmp/mlruns"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_roundtrip_yaml_and_digest(tmp_path):
    cfg = build_config({}, ["model.mask_ratio=0.6"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    again = load_config(p)
    assert again == cfg and again.digest() == cfg.digest()
    assert build_config({}, ["train.storage_path=/elsewhere"]).digest() == build_config({}).digest()
    assert build_config({}, ["model.mask_ratio=0.5"]).digest() != build_config({}).digest()


def test_accumulation():
    cfg = build_config({}, ["train.batch_size=64", "train.num_workers=2", "train.micro_batch_size=8"])
    assert cfg.micro_batch == 8 and cfg.accum_steps == 4
    with pytest.raises(ConfigError, match="micro_batch_size=5"):
        build_config({}, ["train.batch_size=64", "train.num_workers=2", "train.micro_batch_size=5"])


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert build_config({}).mlflow.tracking_uri == "sqlite:///mlflow.db"  # embedded default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert build_config({}).mlflow.tracking_uri == "http://127.0.0.1:5999"  # the cluster's environment
    from_file = build_config({"mlflow": {"tracking_uri": "sqlite:///f.db"}})
    assert from_file.mlflow.tracking_uri == "sqlite:///f.db"  # the file beats the environment
    assert build_config({"mlflow": {"tracking_uri": "sqlite:///f.db"}},
                        ["mlflow.tracking_uri=sqlite:///o.db"]).mlflow.tracking_uri == "sqlite:///o.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="file:///tmp/mlruns"):  # checked like a configured one
        build_config({})
