"""One typed configuration for every mae-service job.

Layers, merged once: defaults ← ``$MLFLOW_TRACKING_URI`` ← a YAML file ← ``section.key=value`` overrides. The
result is validated before any cluster resource is used; one :class:`ConfigError` names every bad value.

Each field is declared once (:func:`mae_service.config.fields.declare`): default, one-line doc, value checks, and ``defines_run`` (the field
defines what a run learns). :meth:`Config.digest` and :meth:`Config.resume_conflicts` use exactly those fields;
the others (locations, logging cadence, workers, precision) may change when a run resumes from its checkpoint.
Imports neither torch, Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mae_service.config.fields import (
    WHERE,
    ConfigError,
    adopt_credentials,
    beta,
    coerce,
    filled,
    ge,
    is_alias,
    is_model_name,
    one_of,
    plain_name,
    positive,
    rule,
    server_uri,
    unit,
)
from mae_service.config.fields import declare as _f
from mae_service.data.formats import NAMES as _FORMATS
from mae_service.model.presets import MODEL_NAMES, preset

AMP_MODES = ("auto", "bf16", "fp16", "none")
DECODE_DEVICES = ("cpu", "cuda")
__all__ = [
    "AMP_MODES",
    "DECODE_DEVICES",
    "Config",
    "ConfigError",
    "build_config",
    "config_from_dict",
    "load_config",
    "validate",
]


# ---- sections ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train_uri: str = _f("demo_out/data/train", "Training images (s3:// or local).", filled(WHERE + " path"))
    val_uri: str | None = _f(None, "Labelled held-out images for k-NN evaluation (sweeps, end of training).")
    format: str = _f("files", "files (class folders), wds or parquet.", one_of(*_FORMATS), defines_run=True)
    image_size: int = _f(224, "Side of the square crops fed to the model.", positive, defines_run=True)
    s3_endpoint: str | None = _f(None, "Endpoint of an S3-compatible store; default $AWS_ENDPOINT_URL.")
    shard_size: int = _f(256, "Loose files per Ray Data read task.", positive, defines_run=True)
    decode_cpus: float = _f(1.0, "Logical CPUs each Ray Data decode task asks for.", positive)
    decode_device: str = _f("cpu", "Where images are decoded: cpu or cuda.", one_of(*DECODE_DEVICES))


@dataclass
class ModelConfig:
    name: str = _f("mae_vit_base_patch16", "Encoder preset.", one_of(*MODEL_NAMES), defines_run=True)
    patch_size: int | None = _f(None, "Patch side in pixels; None keeps the preset's.", positive, defines_run=True)
    mask_ratio: float = _f(0.75, "Fraction of patches removed from each image.", unit, defines_run=True)
    norm_pix_loss: bool = _f(True, "Loss on per-patch normalised pixels (the paper's choice).", defines_run=True)
    decoder_embed_dim: int = _f(512, "Decoder width.", positive, defines_run=True)
    decoder_depth: int = _f(8, "Decoder blocks.", ge(1), defines_run=True)
    decoder_num_heads: int = _f(16, "Decoder attention heads.", positive, defines_run=True)


@dataclass
class TrainConfig:
    num_workers: int = _f(2, "Ray Train workers (DDP ranks).", ge(1))
    use_gpu: bool = _f(False, "One GPU per worker.")
    cpus_per_worker: float = _f(1.0, "Logical CPUs each worker asks for.", positive)
    epochs: int = _f(1, "Passes over the training set (the schedule's length).", ge(1), defines_run=True)
    max_steps: int | None = _f(None, "Stop after this many optimiser steps (None: all epochs).", ge(1, " or null"))
    batch_size: int = _f(4096, "Global batch per optimiser step (all workers together).", ge(1), defines_run=True)
    micro_batch_size: int | None = _f(None, "Per-worker batch per forward pass; None: no accumulation.", ge(1))
    blr: float = _f(1.5e-4, "Base learning rate: lr = blr × batch_size / 256.", positive, defines_run=True)
    lr: float | None = _f(None, "Absolute learning rate; overrides blr when set.", positive, defines_run=True)
    min_lr: float = _f(0.0, "Floor of the cosine schedule.", ge(0), defines_run=True)
    weight_decay: float = _f(0.05, "AdamW weight decay.", ge(0), defines_run=True)
    warmup_epochs: float = _f(40.0, "Linear warm-up length in epochs.", ge(0), defines_run=True)
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas.", each=beta, defines_run=True)
    amp: str = _f("auto", "Autocast: auto (bf16 where supported), bf16, fp16 (GPU), none.", one_of(*AMP_MODES))
    compile: bool = _f(False, "torch.compile the model in each worker (on CPU: +0–5 % per step, minutes to compile).")
    seed: int = _f(0, "Seed of the weights, masks and data order.", defines_run=True)
    storage_path: str = _f("demo_out/checkpoints", "Checkpoint root (s3:// or local).", filled(WHERE + " folder"))
    run_name: str | None = _f(None, "Same run name → the job continues that run from its last checkpoint.", plain_name)
    max_failures: int = _f(2, "Restarts after a worker failure (-1: unlimited).", ge(-1, " (-1: unlimited)"))
    checkpoint_every_steps: int = _f(50, "Optimiser steps between checkpoints.", ge(1))
    keep_checkpoints: int = _f(2, "Most recent checkpoints kept.", ge(1))
    log_every_steps: int = _f(1, "Optimiser steps between metric logs.", ge(1))
    picture_every_steps: int = _f(100, "Optimiser steps between reconstruction pictures.", ge(1))
    eval_every_steps: int = _f(0, "Steps between k-NN evaluations on data.val_uri (0: only at the end).", ge(0))
    knn_k: int = _f(20, "Neighbours of the k-NN evaluation.", ge(1), defines_run=True)
    max_nonfinite_skips: int = _f(10, "Non-finite losses in a row skipped before a rollback.", ge(0), defines_run=True)


@dataclass
class TuneConfig:
    num_samples: int = _f(1, "Repeats of the grid (grid search over the lists below).", ge(1))
    mask_ratios: list[float] = _f(
        [0.5, 0.75, 0.9], "Grid of model.mask_ratio.", filled("give at least one ratio in (0, 1)"), each=unit
    )
    decoder_embed_dims: list[int] = _f(
        [256, 512], "Grid of model.decoder_embed_dim.", filled("give at least one width"), each=positive
    )
    decoder_depths: list[int] = _f([], "Grid of model.decoder_depth; empty: keep model.decoder_depth.", each=ge(1))
    metric: str = _f("knn_top1", "Objective the trials report (k-NN top-1 on data.val_uri).", one_of("knn_top1"))
    scheduler: str = _f("asha", "asha (stop poor trials early) or none.", one_of("asha", "none"))
    grace_period: int = _f(1, "ASHA: evaluations a trial gets before it can be stopped.", ge(1))
    reduction_factor: int = _f(2, "ASHA: 1/reduction_factor of the trials go on at each rung.", ge(2))
    max_concurrent_trials: int = _f(0, "Trials at once; 0: as many as the cluster's resources allow.", ge(0))
    best_alias: str = _f("best", "Registry alias given to the best trial's encoder.", is_alias)


@dataclass
class MlflowConfig:
    tracking_uri: str = _f("sqlite:///mlflow.db", "Tracking store; unset: $MLFLOW_TRACKING_URI.", filled(), server_uri)
    experiment: str = _f("mae-service", "Experiment the runs are logged under.", filled())
    log_system_metrics: bool = _f(True, "Log CPU, GPU and memory use with each run.")


@dataclass
class RegistryConfig:
    model_name: str = _f("mae-encoder", "Registered model the encoder becomes a version of.", filled(), is_model_name)
    alias: str = _f("current", "Alias set on the new version (models:/NAME@ALIAS).", is_alias)
    register: bool = _f(True, "Register the encoder when training ends.")


@dataclass
class FinetuneConfig:
    """The paper's fine-tuning recipe (MAE appendix A.2), scaled by the budget; ``mae-service eval finetune``."""

    model_uri: str | None = _f(None, "Registered encoder to fine-tune (models:/NAME@ALIAS or models:/NAME/VERSION).")
    blocks: int | None = _f(
        None, "Train only the last K blocks (+ final norm, head); 0: linear probe; None: all.", ge(0)
    )
    from_scratch: bool = _f(False, "Same architecture from timm's random initialisation (the baseline).")
    epochs: int = _f(100, "Fine-tuning epochs (the paper: 100 for ViT-B, 50 for ViT-L/H).", ge(1))
    batch_size: int = _f(1024, "Global batch per optimiser step (all workers together).", ge(1))
    blr: float = _f(1e-3, "Base learning rate: lr = blr × batch_size / 256.", positive)
    min_lr: float = _f(1e-6, "Floor of the cosine schedule.", ge(0))
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases and norms).", ge(0))
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas.", each=beta)
    layer_decay: float = _f(
        0.75,
        "Layer-wise lr decay (0.75 for ViT-B, 0.65 for ViT-L/H).",
        rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    )
    drop_path: float = _f(0.1, "Stochastic depth rate.", rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    smoothing: float = _f(0.1, "Label smoothing.", rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    mixup: float = _f(0.8, "Mixup alpha (0: off).", ge(0))
    cutmix: float = _f(1.0, "CutMix alpha (0: off).", ge(0))
    warmup_epochs: float = _f(5.0, "Linear warm-up length in epochs.", ge(0))
    run_name: str | None = _f(None, "Same run name → the job continues that fine-tune from its checkpoint.", plain_name)
    model_name: str | None = _f(None, "Registered name of the classifier (default <source name>-ft).", is_model_name)
    alias: str = _f("current", "Alias set on the classifier's new version.", is_alias)
    register: bool = _f(True, "Register the fine-tuned classifier when training ends.")
    checkpoint_every_epochs: int = _f(1, "Epochs between checkpoints (and the last step).", ge(1))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

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
        """Absolute learning rate: ``train.lr``, else ``train.blr × train.batch_size / 256``."""
        return self.train.lr if self.train.lr is not None else self.train.blr * self.train.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        """``{section: {key: value}}``; :func:`config_from_dict` rebuilds the config from it."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for MLflow params."""
        return {key: value for key, _, value in _fields(self)}

    def to_yaml(self) -> str:
        """The resolved config as YAML; :func:`load_config` reads it back to an equal config."""
        return yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False)  # tuples → lists

    def digest(self) -> str:
        """Short hash of the fields that define what a run learns (``defines_run``)."""
        run = {key: value for key, f, value in _fields(self) if f.metadata["defines_run"]}
        return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]

    def resume_conflicts(self, saved: dict[str, Any]) -> list[str]:
        """``"key: checkpoint has A, this job asks B"`` for each field that defines the run and differs from
        ``saved`` (an older :meth:`to_dict`). A field ``saved`` lacks counts as its default."""
        out, defaults = [], Config().flat()
        for key, f, new in _fields(self):
            sec, name = key.split(".")
            old = (saved.get(sec) or {}).get(name, defaults[key])
            if isinstance(old, list | tuple) and isinstance(new, list | tuple):
                old, new = list(old), list(new)
            if f.metadata["defines_run"] and old != new:
                out.append(f"{key}: checkpoint has {old!r}, this job asks {new!r}")
        return out


_SECTIONS: dict[str, Any] = get_type_hints(Config)


def _fields(cfg: Config) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``("section.key", field, value)`` for every field, in declaration order."""
    for sec in _SECTIONS:
        body = getattr(cfg, sec)
        yield from ((f"{sec}.{f.name}", f, getattr(body, f.name)) for f in dataclasses.fields(body))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected KEY=VALUE, e.g. model.mask_ratio=0.6"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _merge(raw: Any, overrides: list[str] | tuple[str, ...], problems: list[str]) -> dict[str, dict[str, Any]]:
    """``raw`` (nested, as in YAML) ← ``overrides``; ``$MLFLOW_TRACKING_URI`` where neither sets the URI."""
    if not isinstance(raw, dict):
        raise ConfigError([f"config file must be a mapping of sections {sorted(_SECTIONS)}, got {type(raw).__name__}"])
    merged: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    allowed = ", ".join(_SECTIONS)
    for sec, body in raw.items():
        if sec not in _SECTIONS:
            problems.append(f"unknown section {sec!r}; allowed: {allowed}")
        elif body is not None and not isinstance(body, dict):
            problems.append(f"section {sec!r} must be a mapping, got {body!r}")
        else:
            merged[sec].update(body or {})
    for ov in overrides:
        key, value = _parse_override(ov)
        sec, _, sub = key.partition(".")
        if not sub:
            problems.append(f"override {ov!r}: expected SECTION.KEY=VALUE with SECTION in {allowed}")
        elif sec not in _SECTIONS:
            problems.append(f"override {ov!r}: unknown section {sec!r}; allowed: {allowed}")
        else:
            merged[sec][sub] = value
    # Like the ``mae-service models`` commands: clusters hand the tracking URI out in $MLFLOW_TRACKING_URI
    # (e.g. from the KubeRay Secret); a file or override still wins.
    if "tracking_uri" not in merged["mlflow"] and os.environ.get("MLFLOW_TRACKING_URI"):
        merged["mlflow"]["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    # ``http://user:password@host``: the credentials move to MLflow's auth variables (which the driver passes to
    # its workers), so no config — params, config.yaml, checkpoints, worker arguments — ever holds them
    if isinstance(merged["mlflow"].get("tracking_uri"), str):
        merged["mlflow"]["tracking_uri"] = adopt_credentials(merged["mlflow"]["tracking_uri"])
    return merged


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge defaults ← ``$MLFLOW_TRACKING_URI`` ← ``raw`` (nested dict, as in YAML) ← ``overrides``; validate."""
    problems: list[str] = []
    merged = _merge({} if raw is None else raw, overrides, problems)
    sections = {}
    for sec, cls in _SECTIONS.items():
        hints, kwargs = get_type_hints(cls), {}
        for key, value in merged[sec].items():
            if key not in hints:
                problems.append(f"unknown key {sec}.{key}; allowed: {', '.join(sorted(hints))}")
            else:
                kwargs[key] = coerce(value, hints[key], f"{sec}.{key}", problems)
        sections[sec] = cls(**kwargs)
    cfg = Config(**sections)
    problems = problems or validate(cfg)  # type problems make the value checks meaningless
    if problems:
        raise ConfigError(problems)
    return cfg


# ---- validation ----------------------------------------------------------------------------------------------
def validate(cfg: Config) -> list[str]:
    """Every value problem of a well-typed config: the checks declared on the fields, then those across fields."""
    p: list[str] = []
    for key, f, value in _fields(cfg):
        msg = next((m for check in f.metadata["checks"] if (m := check(value))), None) if value is not None else None
        p += [f"{key} {msg}" if msg.startswith("is ") else f"{key}={value!r}: {msg}"] if msg else []
        if not msg and f.metadata["each"]:
            p += [f"{key} contains {x!r}: each {m}" for x in value if (m := f.metadata["each"](x))]
    return p + _cross_checks(cfg)


def _cross_checks(cfg: Config) -> list[str]:
    """Checks relating fields; each runs only when the fields passed their own checks."""
    p: list[str] = []
    d, m, t = cfg.data, cfg.model, cfg.train
    patch = m.patch_size or (preset(m.name)["patch_size"] if m.name in MODEL_NAMES else 0)
    if patch > 0 and d.image_size > 0 and d.image_size % patch:
        p.append(f"data.image_size={d.image_size} is not divisible by the patch size {patch} (model.patch_size)")
    heads = m.decoder_num_heads
    if heads > 0 and m.decoder_embed_dim > 0 and m.decoder_embed_dim % heads:
        p.append(
            f"model.decoder_embed_dim={m.decoder_embed_dim} must be a positive multiple of "
            f"model.decoder_num_heads={heads}"
        )
    p += [
        f"tune.decoder_embed_dims contains {w}: each must be a positive multiple of model.decoder_num_heads={heads}"
        for w in cfg.tune.decoder_embed_dims
        if heads > 0 and w > 0 and w % heads
    ]
    if t.batch_size >= 1 and t.num_workers >= 1:
        per_worker, rest = divmod(t.batch_size, t.num_workers)
        micro = t.micro_batch_size
        if rest:
            p.append(f"train.batch_size={t.batch_size} (global) is not divisible by train.num_workers={t.num_workers}")
        elif micro is not None and micro >= 1 and per_worker % micro:
            p.append(
                f"train.micro_batch_size={micro} must divide the per-worker batch {per_worker} "
                "(train.batch_size / train.num_workers)"
            )
    ft = cfg.finetune
    if ft.from_scratch and ft.blocks is not None:
        p.append(
            f"finetune.from_scratch=true with finetune.blocks={ft.blocks}: the scratch baseline trains every block "
            "(drop --blocks, or --from-scratch)"
        )
    if ft.batch_size >= 1 and t.num_workers >= 1:
        per_worker, rest = divmod(ft.batch_size, t.num_workers)
        if rest:
            p.append(
                f"finetune.batch_size={ft.batch_size} (global) is not divisible by train.num_workers={t.num_workers}"
            )
        elif per_worker % 2 and (ft.mixup > 0 or ft.cutmix > 0):
            p.append(
                f"finetune.batch_size={ft.batch_size} gives {per_worker} images per worker: mixup/cutmix pair images "
                "within a batch, so it must be even (or set finetune.mixup=0 finetune.cutmix=0)"
            )
    if d.decode_device == "cuda" and not t.use_gpu:
        p.append(
            f"data.decode_device={d.decode_device!r} needs train.use_gpu=true (JPEGs are decoded on each worker's "
            "GPU); without GPUs use data.decode_device=cpu"
        )
    if t.amp == "fp16" and not t.use_gpu:  # bf16 may run on CPUs that have it: checked at run time
        p.append("train.amp='fp16' needs train.use_gpu=true (fp16 autocast is GPU-only; on CPU use auto, bf16 or none)")
    return p


# ---- files ---------------------------------------------------------------------------------------------------
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
