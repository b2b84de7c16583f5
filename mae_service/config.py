"""One typed configuration for every mae-service job.

Layers, merged once: the defaults below ← a YAML file ← ``key.sub=value`` overrides. :func:`load_config`
validates the result and raises one :class:`ConfigError` that names every bad value, before any cluster
resource is used. The resolved config is saved with every run (MLflow params, checkpoints).

This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

DATA_FORMATS = ("files", "wds", "parquet")
AMP_MODES = ("auto", "bf16", "fp16", "none")


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass
class DataConfig:
    train_uri: str = "demo_out/data/train"
    """Training images: ``s3://bucket/prefix`` or a local path."""
    val_uri: str | None = None
    """Labelled held-out images (k-NN evaluation during sweeps and after training); optional."""
    format: str = "files"
    """``files`` (loose images, class folders give labels), ``wds`` (WebDataset tar shards), ``parquet``."""
    image_size: int = 224
    """Side of the square crops fed to the model."""
    s3_endpoint: str | None = None
    """Endpoint override for S3-compatible stores; defaults to ``AWS_ENDPOINT_URL`` when set."""
    shard_size: int = 256
    """Loose files are read in groups of this many keys per Ray Data task."""
    decode_cpus: float = 1.0
    """Logical CPUs each Ray Data decode task asks for."""


@dataclass
class ModelConfig:
    name: str = "mae_vit_base_patch16"
    patch_size: int | None = None
    """None keeps the preset's patch size."""
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: run all epochs)."""
    batch_size: int = 4096
    """Global batch per optimiser step (all workers, after gradient accumulation)."""
    micro_batch_size: int | None = None
    """Per-worker batch per forward pass; None = batch_size / num_workers (no accumulation)."""
    blr: float = 1.5e-4
    """Base learning rate: lr = blr × batch_size / 256 (the paper's linear scaling rule)."""
    lr: float | None = None
    """Absolute learning rate; overrides blr when set."""
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    betas: tuple[float, float] = (0.9, 0.95)
    amp: str = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    seed: int = 0
    storage_path: str = "demo_out/checkpoints"
    run_name: str | None = None
    """Same run name → the job continues that run from its last checkpoint."""
    max_failures: int = 2
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    picture_every_steps: int = 100
    eval_every_steps: int = 0
    """k-NN evaluation on data.val_uri every N steps (0: only at the end, if val data is set)."""
    knn_k: int = 20
    max_nonfinite_skips: int = 10
    """Consecutive non-finite losses tolerated (step skipped) before rolling back to the last checkpoint."""


@dataclass
class TuneConfig:
    num_samples: int = 1
    """Repeats of the grid (grid search over the lists below)."""
    mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])
    decoder_embed_dims: list[int] = field(default_factory=lambda: [256, 512])
    decoder_depths: list[int] = field(default_factory=list)
    """Empty: keep model.decoder_depth."""
    metric: str = "knn_top1"
    scheduler: str = "asha"
    grace_period: int = 1
    """ASHA: evaluations a trial gets before it can be stopped."""
    reduction_factor: int = 2
    max_concurrent_trials: int = 0
    """0: as many as the cluster's resources allow."""
    best_alias: str = "best"


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "mae-service"
    log_system_metrics: bool = True


@dataclass
class RegistryConfig:
    model_name: str = "mae-encoder"
    alias: str = "current"
    register: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Per-worker batch of one forward pass."""
        return self.train.micro_batch_size or self.train.batch_size // self.train.num_workers

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimiser step on each worker."""
        return self.train.batch_size // (self.micro_batch * self.train.num_workers)

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else self.train.blr * self.train.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def digest(self) -> str:
        """Short hash of the settings that define what is learnt (not where it is stored or logged)."""
        d = self.to_dict()
        keep = {"data": d["data"], "model": d["model"], "train": {k: v for k, v in d["train"].items()
                                                                if k not in ("storage_path", "run_name", "max_failures")}}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {name: hints[name] for name in _SECTIONS}


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert a YAML/CLI value to the field's type, or record a problem."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{where}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            problems.append(f"{where}={value!r}: expected an integer")
            return value
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (ValueError, OverflowError):
            problems.append(f"{where}={value!r}: expected an integer")
            return value
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}={value!r}: expected a number")
            return value
    if tp is str:
        if isinstance(value, dict | list):
            problems.append(f"{where}={value!r}: expected a string")
            return value
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list | tuple):
            problems.append(f"{where}={value!r}: expected a list")
            return value
        if origin is tuple:
            if len(value) != len(args):
                problems.append(f"{where}={value!r}: expected {len(args)} values")
                return value
            return tuple(_coerce(v, a, f"{where}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected KEY=VALUE, e.g. model.mask_ratio=0.6"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge defaults ← ``$MLFLOW_TRACKING_URI`` ← ``raw`` (nested dict, as in YAML) ← ``overrides``; validate."""
    problems: list[str] = []
    merged: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file must be a mapping of sections {sorted(_SECTIONS)}, got {type(raw).__name__}"])
    for sec, body in raw.items():
        if sec not in _SECTIONS:
            problems.append(f"unknown section {sec!r}; allowed: {', '.join(_SECTIONS)}")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"section {sec!r} must be a mapping, got {body!r}")
            continue
        merged[sec].update(body)
    for ov in overrides:
        key, value = _parse_override(ov)
        if "." not in key:
            problems.append(f"override {ov!r}: expected SECTION.KEY=VALUE with SECTION in {', '.join(_SECTIONS)}")
            continue
        sec, sub = key.split(".", 1)
        if sec not in _SECTIONS:
            problems.append(f"override {ov!r}: unknown section {sec!r}; allowed: {', '.join(_SECTIONS)}")
            continue
        merged[sec][sub] = value
    # Like the ``mae-service models`` commands: a tracking URI not given in the file or overrides comes from
    # $MLFLOW_TRACKING_URI (how clusters hand it out, e.g. the KubeRay Secret), else the embedded default.
    if "tracking_uri" not in merged["mlflow"] and os.environ.get("MLFLOW_TRACKING_URI"):
        merged["mlflow"]["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]

    sections: dict[str, Any] = {}
    for sec, cls in _section_types().items():
        hints = get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in merged[sec].items():
            if key not in known:
                problems.append(f"unknown key {sec}.{key}; allowed: {', '.join(sorted(known))}")
                continue
            kwargs[key] = _coerce(value, hints[key], f"{sec}.{key}", problems)
        sections[sec] = cls(**kwargs)
    cfg = Config(**sections)
    if problems:  # type problems make the value checks below meaningless
        raise ConfigError(problems)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Value checks across fields; returns every problem found (empty when valid)."""
    from mae_service.model import MODEL_NAMES, preset  # pure module: no Ray, no MLflow

    p: list[str] = []
    d, m, t, tu = cfg.data, cfg.model, cfg.train, cfg.tune
    if not d.train_uri:
        p.append("data.train_uri is empty: give s3://bucket/prefix or a local path")
    if d.format not in DATA_FORMATS:
        p.append(f"data.format={d.format!r}: allowed {', '.join(DATA_FORMATS)}")
    if d.image_size <= 0:
        p.append(f"data.image_size={d.image_size}: must be positive")
    if d.shard_size <= 0:
        p.append(f"data.shard_size={d.shard_size}: must be positive")
    if d.decode_cpus <= 0:
        p.append(f"data.decode_cpus={d.decode_cpus}: must be positive")

    if m.name not in MODEL_NAMES:
        p.append(f"model.name={m.name!r}: allowed {', '.join(MODEL_NAMES)}")
        patch = m.patch_size
    else:
        patch = m.patch_size or preset(m.name)["patch_size"]
    if patch is not None and (patch <= 0 or d.image_size % patch):
        p.append(f"data.image_size={d.image_size} is not divisible by the patch size {patch} (model.patch_size)")
    if not 0.0 < m.mask_ratio < 1.0:
        p.append(f"model.mask_ratio={m.mask_ratio}: must be in (0, 1)")
    if m.decoder_embed_dim <= 0 or m.decoder_num_heads <= 0 or m.decoder_embed_dim % m.decoder_num_heads:
        p.append(f"model.decoder_embed_dim={m.decoder_embed_dim} must be a positive multiple of "
                 f"model.decoder_num_heads={m.decoder_num_heads}")
    if m.decoder_depth < 1:
        p.append(f"model.decoder_depth={m.decoder_depth}: must be ≥ 1")

    if t.num_workers < 1:
        p.append(f"train.num_workers={t.num_workers}: must be ≥ 1")
    if t.cpus_per_worker <= 0:
        p.append(f"train.cpus_per_worker={t.cpus_per_worker}: must be positive")
    if t.epochs < 1:
        p.append(f"train.epochs={t.epochs}: must be ≥ 1")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"train.max_steps={t.max_steps}: must be ≥ 1 or null")
    if t.batch_size < 1:
        p.append(f"train.batch_size={t.batch_size}: must be ≥ 1")
    elif t.num_workers >= 1 and t.batch_size % t.num_workers:
        p.append(f"train.batch_size={t.batch_size} (global) is not divisible by train.num_workers={t.num_workers}")
    elif t.micro_batch_size is not None:
        per_worker = t.batch_size // t.num_workers
        if t.micro_batch_size < 1 or per_worker % t.micro_batch_size:
            p.append(f"train.micro_batch_size={t.micro_batch_size} must divide the per-worker batch "
                     f"{per_worker} (train.batch_size / train.num_workers)")
    if t.lr is not None and t.lr <= 0:
        p.append(f"train.lr={t.lr}: must be positive")
    if t.blr <= 0:
        p.append(f"train.blr={t.blr}: must be positive")
    if t.min_lr < 0:
        p.append(f"train.min_lr={t.min_lr}: must be ≥ 0")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay={t.weight_decay}: must be ≥ 0")
    if t.warmup_epochs < 0:
        p.append(f"train.warmup_epochs={t.warmup_epochs}: must be ≥ 0")
    if not all(0.0 <= b < 1.0 for b in t.betas):
        p.append(f"train.betas={list(t.betas)}: each must be in [0, 1)")
    if t.amp not in AMP_MODES:
        p.append(f"train.amp={t.amp!r}: allowed {', '.join(AMP_MODES)}")
    if t.amp in ("bf16", "fp16") and not t.use_gpu:
        p.append(f"train.amp={t.amp!r} needs train.use_gpu=true (use auto or none on CPU)")
    if not t.storage_path:
        p.append("train.storage_path is empty: give s3://bucket/prefix or a local folder")
    if t.run_name is not None and (not t.run_name or "/" in t.run_name or t.run_name.startswith(".")):
        p.append(f"train.run_name={t.run_name!r}: must be a plain name (no '/', not starting with '.')")
    if t.max_failures < -1:
        p.append(f"train.max_failures={t.max_failures}: must be ≥ 0 (or -1 for unlimited)")
    for key in ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "picture_every_steps", "knn_k"):
        if getattr(t, key) < 1:
            p.append(f"train.{key}={getattr(t, key)}: must be ≥ 1")
    if t.eval_every_steps < 0:
        p.append(f"train.eval_every_steps={t.eval_every_steps}: must be ≥ 0")

    if tu.num_samples < 1:
        p.append(f"tune.num_samples={tu.num_samples}: must be ≥ 1")
    if not tu.mask_ratios:
        p.append("tune.mask_ratios is empty: give at least one ratio in (0, 1)")
    for r in tu.mask_ratios:
        if not 0.0 < r < 1.0:
            p.append(f"tune.mask_ratios contains {r}: each must be in (0, 1)")
    if not tu.decoder_embed_dims:
        p.append("tune.decoder_embed_dims is empty: give at least one width")
    for w in tu.decoder_embed_dims:
        if w <= 0 or w % m.decoder_num_heads:
            p.append(f"tune.decoder_embed_dims contains {w}: each must be a positive multiple of "
                     f"model.decoder_num_heads={m.decoder_num_heads}")
    for dd in tu.decoder_depths:
        if dd < 1:
            p.append(f"tune.decoder_depths contains {dd}: each must be ≥ 1")
    if tu.metric not in ("knn_top1", "val_loss"):
        p.append(f"tune.metric={tu.metric!r}: allowed knn_top1, val_loss")
    if tu.scheduler not in ("asha", "none"):
        p.append(f"tune.scheduler={tu.scheduler!r}: allowed asha, none")
    if tu.grace_period < 1:
        p.append(f"tune.grace_period={tu.grace_period}: must be ≥ 1")
    if tu.reduction_factor < 2:
        p.append(f"tune.reduction_factor={tu.reduction_factor}: must be ≥ 2")
    if tu.max_concurrent_trials < 0:
        p.append(f"tune.max_concurrent_trials={tu.max_concurrent_trials}: must be ≥ 0")

    if not cfg.mlflow.tracking_uri:
        p.append("mlflow.tracking_uri is empty")
    elif cfg.mlflow.tracking_uri.startswith("file:") or "://" not in cfg.mlflow.tracking_uri:
        p.append(f"mlflow.tracking_uri={cfg.mlflow.tracking_uri!r}: MLflow 3 needs a database or server URI "
                 "(sqlite:///mlflow.db, http://host:5000)")
    if not cfg.mlflow.experiment:
        p.append("mlflow.experiment is empty")
    if not cfg.registry.model_name:
        p.append("registry.model_name is empty")
    if (not cfg.registry.alias or cfg.registry.alias.lower() == "latest"
            or cfg.registry.alias.lower().startswith("v") and cfg.registry.alias[1:].isdigit()):
        p.append(f"registry.alias={cfg.registry.alias!r}: must be a name (not empty, not 'latest', not of the form "
                 "v<number>: MLflow reserves those)")
    return p


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML) if given, apply ``overrides``, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"])
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"config file {str(path)!r} is not valid YAML: {e}"]) from None
    return build_config(raw, overrides)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return build_config(d)


def dump_yaml(cfg: Config) -> str:
    d = cfg.to_dict()
    d["train"]["betas"] = list(d["train"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)
