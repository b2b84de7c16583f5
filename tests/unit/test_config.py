import dataclasses
import json
from pathlib import Path

import pytest

from mae_service.config import Config, ConfigError, build_config, config_from_dict, load_config

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
    cfg = build_config(
        {},
        [
            "model.mask_ratio=0.6",
            "train.use_gpu=false",
            "train.epochs=3",
            "data.val_uri=null",
            "tune.mask_ratios=[0.5, 0.9]",
            "train.betas=[0.9, 0.99]",
        ],
    )
    assert cfg.model.mask_ratio == 0.6 and cfg.train.epochs == 3 and cfg.data.val_uri is None
    assert cfg.tune.mask_ratios == [0.5, 0.9] and cfg.train.betas == (0.9, 0.99)


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        build_config(
            {},
            [
                "model.mask_ratio=1.0",
                "data.image_size=225",
                "train.batch_size=9",
                "train.num_workers=2",
                "model.decoder_embed_dim=100",
                "data.format=zip",
                "train.epochs=two",
            ],
        )
    text = str(e.value)
    assert "train.epochs='two'" in text  # type errors are reported first, on their own
    with pytest.raises(ConfigError) as e:
        build_config(
            {},
            [
                "model.mask_ratio=1.0",
                "data.image_size=225",
                "train.batch_size=9",
                "train.num_workers=2",
                "model.decoder_embed_dim=100",
                "data.format=zip",
            ],
        )
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
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again == cfg and again.digest() == cfg.digest()
    assert "betas:\n  - 0.9\n  - 0.95\n" in cfg.to_yaml()  # a plain list, not a Python tuple tag
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
    assert (
        build_config(
            {"mlflow": {"tracking_uri": "sqlite:///f.db"}}, ["mlflow.tracking_uri=sqlite:///o.db"]
        ).mlflow.tracking_uri
        == "sqlite:///o.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="file:///tmp/mlruns"):  # checked like a configured one
        build_config({})


# The settings a run may change when it resumes (how it is stored, observed and spread over workers);
# every other data/model/train field defines what the run learns.
RESUMABLE = {
    "train.max_steps",
    "train.storage_path",
    "train.run_name",
    "train.max_failures",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.picture_every_steps",
    "train.eval_every_steps",
    "train.num_workers",
    "train.cpus_per_worker",
    "train.use_gpu",
    "train.amp",
    "train.compile",
    "train.micro_batch_size",
    "data.decode_cpus",
    "data.decode_device",
    "data.train_uri",
    "data.val_uri",
    "data.s3_endpoint",
}


def _fields():
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):
            yield f"{sec.name}.{f.name}", f


def test_every_field_has_a_one_line_doc():
    for key, f in _fields():
        doc = f.metadata.get("doc", "")
        assert doc and "\n" not in doc and doc.endswith("."), key


def test_defines_run_flags_are_the_complement_of_the_resumable_settings():
    run = {key for key, f in _fields() if f.metadata["defines_run"]}
    learnt = {key for key, _ in _fields() if key.split(".")[0] in ("data", "model", "train")} - RESUMABLE
    assert run == learnt


def test_digest_hashes_exactly_the_fields_that_define_the_run():
    base = build_config({}).digest()
    for ov in (
        "train.max_steps=5",
        "train.num_workers=4",
        "train.amp=none",
        "data.train_uri=s3://b/x",
        "train.log_every_steps=7",
        "train.compile=true",
        "mlflow.experiment=other",
        "tune.num_samples=3",
    ):
        assert build_config({}, [ov]).digest() == base, ov
    for ov in ("train.seed=1", "train.epochs=2", "data.image_size=192", "model.norm_pix_loss=false", "train.knn_k=5"):
        assert build_config({}, [ov]).digest() != base, ov


def test_resume_conflicts():
    a = build_config({}, ["model.name=mae_vit_tiny_patch16", "train.batch_size=64"])
    same = build_config(
        {},
        [
            "model.name=mae_vit_tiny_patch16",
            "train.batch_size=64",
            "train.max_steps=10",
            "train.num_workers=4",
            "train.amp=none",
            "data.train_uri=/other",
        ],
    )
    assert same.resume_conflicts(a.to_dict()) == []
    saved = json.loads(json.dumps(a.to_dict()))  # as read back from a checkpoint: betas become a list
    assert same.resume_conflicts(saved) == []
    b = build_config(
        {},
        ["model.name=mae_vit_tiny_patch16", "train.batch_size=64", "model.mask_ratio=0.5", "train.betas=[0.9, 0.99]"],
    )
    assert b.resume_conflicts(saved) == [
        "model.mask_ratio: checkpoint has 0.75, this job asks 0.5",
        "train.betas: checkpoint has [0.9, 0.95], this job asks [0.9, 0.99]",
    ]
    del saved["train"]["seed"], saved["train"]["compile"]  # an older checkpoint: missing fields are their defaults
    saved["train"]["gone"] = 1  # a key that no longer exists is ignored
    assert a.resume_conflicts(saved) == []
    assert build_config({}, ["train.seed=3"]).resume_conflicts({}) == ["train.seed: checkpoint has 0, this job asks 3"]


def test_config_from_dict_roundtrip():
    cfg = build_config({}, ["train.run_name=r1", "data.decode_device=cuda", "train.use_gpu=true", "train.compile=yes"])
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.flat()["train.compile"] is True and cfg.flat()["data.decode_device"] == "cuda"


def _problems(*overrides):
    with pytest.raises(ConfigError) as e:
        build_config({}, list(overrides))
    return e.value.problems


@pytest.mark.parametrize("key", ["registry.alias", "tune.best_alias"])
@pytest.mark.parametrize("value", ["my alias!", "latest", "LATEST", "v3", "V12", "''", "a" * 256])
def test_bad_aliases(key, value):
    (p,) = _problems(f"{key}={value}")
    assert p.startswith(f"{key}=") and "letters, digits, '_' or '-'" in p and "v<number>" in p


@pytest.mark.parametrize("value", ["champion", "best-2", "v1_old", "version3", "a" * 255])
def test_good_aliases(value):
    assert build_config({}, [f"registry.alias={value}", f"tune.best_alias={value}"]).registry.alias == value


@pytest.mark.parametrize("value", ["team/encoder", "enc@prod", "a:b", "x" * 256])
def test_bad_model_names(value):
    (p,) = _problems(f"registry.model_name={value}")
    assert p.startswith(f"registry.model_name={value!r}") and "'/'" in p and "'@'" in p and "255" in p


def test_empty_names():
    with pytest.raises(ConfigError) as e:
        build_config({"mlflow": {"experiment": " "}, "registry": {"model_name": ""}})
    assert e.value.problems == ["mlflow.experiment is empty", "registry.model_name is empty"]
    assert build_config({}, ["registry.model_name=mae.encoder-v2_x"]).registry.model_name == "mae.encoder-v2_x"


def test_tune_metric_is_knn_top1():
    assert _problems("tune.metric=val_loss") == ["tune.metric='val_loss': allowed knn_top1"]


def test_compile_is_a_boolean():
    assert build_config({}, ["train.compile=true"]).train.compile is True
    assert build_config({}).train.compile is False
    assert _problems("train.compile=fast") == ["train.compile='fast': expected true or false"]
    assert _problems("train.compile=maybe") == ["train.compile='maybe': expected true or false"]
    with pytest.raises(ConfigError, match="train.compile=3: expected true or false"):
        build_config({"train": {"compile": 3}})


def test_amp_modes_and_devices():
    (p,) = _problems("train.amp=fp8")
    assert p == "train.amp='fp8': allowed auto, bf16, fp16, none"
    (p,) = _problems("train.amp=fp16", "train.use_gpu=false")
    assert "train.amp='fp16' needs train.use_gpu=true" in p
    assert build_config({}, ["train.amp=fp16", "train.use_gpu=true"]).train.amp == "fp16"
    assert build_config({}, ["train.amp=bf16", "train.use_gpu=false"]).train.amp == "bf16"  # CPUs with bf16


def test_decode_device():
    assert build_config({}).data.decode_device == "cpu"
    assert build_config({}, ["data.decode_device=cuda", "train.use_gpu=true"]).data.decode_device == "cuda"
    assert _problems("data.decode_device=gpu") == ["data.decode_device='gpu': allowed cpu, cuda"]
    (problem,) = _problems("data.decode_device=cuda")  # train.use_gpu defaults to false
    assert "data.decode_device='cuda'" in problem and "train.use_gpu=true" in problem


def test_data_format_allowed_values_come_from_the_formats_package():
    from mae_service.data.formats import NAMES

    (p,) = _problems("data.format=zip")
    assert p == f"data.format='zip': allowed {', '.join(NAMES)}"


def test_value_checks_name_the_value():
    assert _problems(
        "train.epochs=0",
        "tune.mask_ratios=[0.5, 1.5]",
        "train.betas=[0.9, 1.0]",
        "data.train_uri=",
        "tune.decoder_embed_dims=[]",
        "train.run_name=a/b",
        "train.max_failures=-2",
        "train.max_steps=0",
    ) == [
        "data.train_uri is empty: give s3://bucket/prefix or a local path",
        "train.epochs=0: must be ≥ 1",
        "train.max_steps=0: must be ≥ 1 or null",
        "train.betas contains 1.0: each must be in [0, 1)",
        "train.run_name='a/b': must be a plain name (no '/', not starting with '.'): 1–200 letters, digits, '_', "
        "'-' or '.', e.g. vitb-800",
        "train.max_failures=-2: must be ≥ -1 (-1: unlimited)",
        "tune.mask_ratios contains 1.5: each must be in (0, 1)",
        "tune.decoder_embed_dims is empty: give at least one width",
    ]


def test_type_problems_all_at_once():
    assert _problems(
        "train.epochs=two", "train.use_gpu=maybe", "train.betas=[0.9]", "tune.mask_ratios=0.5", "data.train_uri=null"
    ) == [
        "data.train_uri=null: expected a string (this key cannot be null)",
        "train.epochs='two': expected an integer",
        "train.use_gpu='maybe': expected true or false",
        "train.betas=[0.9]: expected 2 values",
        "tune.mask_ratios=0.5: expected a list",
    ]
