"""Preflight of a fine-tune: everything checkable before any Ray work, all problems raised at once.

The source must be a registered mae-service encoder (resolved once: the pinned ``models:/NAME/VERSION`` is what
trains and what gets the score); ``finetune.blocks`` must lie in ``0..depth``; the training and held-out data
must be labelled, with at least two classes, and agree on their classes; the tracking store must answer and the
checkpoint bucket exist; there must be data for one step per worker; ``train.amp`` must work on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mae_service.config import Config, ConfigError
from mae_service.tracking.runs import resolve_tracking_uri, tracking_problem
from mae_service.train.preflight import driver_amp, s3_storage_problem
from mae_service.train.step import StepPlan

LABEL_HINT = "fine-tuning needs labels: class folders (files), .cls members (wds) or a label column (parquet)"
SAMPLE_LABELS = 64  # items read to find the labels of a dataset whose listing names no classes


@dataclass
class FinetuneInputs:
    train: Any
    val: Any
    plan: StepPlan
    arch: dict[str, Any]
    """The classifier's architecture (:func:`~mae_service.model.classifier.classifier_architecture`) + class names."""
    encoder_state: dict[str, Any] | None
    """The source encoder's weights (None for ``--from-scratch``)."""
    source_uri: str
    """The pinned ``models:/NAME/VERSION`` of the source encoder."""
    source_name: str
    source_version: int
    source_run: str | None
    amp: str | None


def labels_of(src: Any) -> set[int]:
    """The labels a dataset holds: exact for ``files``; the listing's class ids, else a sample, for the others."""
    if src.fmt == "files":
        import numpy as np

        return {int(label) for label in np.unique(np.concatenate([shard.labels for shard in src.shards]))}
    if src.class_names:
        return set(range(len(src.class_names)))
    import numpy as np

    from mae_service.data import formats

    fs, _ = src.filesystem()
    shard = src.shards[0]
    reader = formats.get(src.fmt).reader(src, fs, shard)
    return {int(f.result()[1]) for f in reader.iter(np.arange(min(shard.count, SAMPLE_LABELS)))}


def _open(cfg: Config, key: str, uri: str | None, problems: list[str]) -> Any:
    from mae_service.data import open_source

    if not uri:
        flag = "--train-data" if key == "data.train_uri" else "--val-data"
        problems.append(f"{key} is empty: give {flag} URI (labelled images, s3:// or a path)")
        return None
    try:
        return open_source(uri, cfg.data.format, shard_size=cfg.data.shard_size, s3_endpoint=cfg.data.s3_endpoint)
    except ValueError as e:
        problems.append(f"{key}: {e}")
        return None


def _label_problems(train: Any, val: Any, cfg: Config) -> list[str]:
    out: list[str] = []
    seen = {}
    for key, src in (("data.train_uri", train), ("data.val_uri", val)):
        if src is None:
            continue
        labelled = {x for x in labels_of(src) if x >= 0}
        seen[key] = labelled
        uri = getattr(cfg.data, key.split(".")[1])
        if not labelled:
            out.append(f"{key}={uri!r} is unlabelled (every label is -1): {LABEL_HINT}")
        elif key == "data.train_uri" and len(labelled) == 1:
            name = src.class_names[0] if src.class_names else next(iter(labelled))
            out.append(f"{key}={uri!r} has one class only ({name!r}): a classifier needs at least 2 classes")
    if train is not None and val is not None and all(seen.values()):
        a, b = train.class_names, val.class_names
        if (a or b) and a != b:
            out.append(
                f"data.train_uri and data.val_uri disagree on their classes: train has {a}, val has {b} "
                "(both must list the same classes, in the same order)"
            )
        elif not (seen["data.val_uri"] <= seen["data.train_uri"]):
            extra = sorted(seen["data.val_uri"] - seen["data.train_uri"])
            out.append(
                f"data.val_uri has labels {extra} that data.train_uri lacks; allowed {sorted(seen['data.train_uri'])}"
            )
    return out


def _source(cfg: Config, problems: list[str]) -> tuple[Any, Any]:
    """``(version, encoder)`` of ``finetune.model_uri``, or Nones with the problem recorded."""
    from mae_service.tracking.registry import check_encoder, load_encoder, pinned_uri, resolve

    uri = cfg.finetune.model_uri
    if not uri:
        problems.append(
            "finetune.model_uri is empty: give --model models:/NAME@ALIAS (a registered mae-service encoder)"
        )
        return None, None
    try:
        client, tracking, mv = resolve(uri, cfg.mlflow.tracking_uri)
        check_encoder(client, mv, uri)
        return mv, load_encoder(pinned_uri(mv), tracking_uri=tracking)
    except ValueError as e:
        problems.append(f"finetune.model_uri={uri!r}: {e}")
        return None, None


def plan_for(cfg: Config, src: Any) -> StepPlan:
    """Fine-tuning's step plan: one micro-batch per step (``finetune.batch_size / train.num_workers`` per rank)."""
    from mae_service.data import samples_per_rank

    micro = cfg.finetune.batch_size // cfg.train.num_workers
    per_rank = samples_per_rank(src, cfg.train.num_workers, micro)
    return StepPlan(micro, 1, per_rank // micro, cfg.finetune.epochs, cfg.train.max_steps)


def preflight(cfg: Config) -> FinetuneInputs:
    """Every check before Ray; one :class:`ConfigError` naming each bad value."""
    from mae_service.model.classifier import classifier_architecture

    problems: list[str] = []
    ft = cfg.finetune
    amp = driver_amp(cfg, problems)
    mv, encoder = _source(cfg, problems)
    arch = None
    if encoder is not None:
        depth = len(encoder.blocks)
        if ft.blocks is not None and ft.blocks > depth:
            problems.append(
                f"finetune.blocks={ft.blocks} (--blocks): must be between 0 and the encoder's depth {depth} "
                f"({ft.model_uri} has {depth} blocks)"
            )
    train = _open(cfg, "data.train_uri", cfg.data.train_uri, problems)
    val = _open(cfg, "data.val_uri", cfg.data.val_uri, problems)
    problems += _label_problems(train, val, cfg)
    if problem := tracking_problem(resolve_tracking_uri(cfg.mlflow.tracking_uri), must_exist=False):
        problems.append(problem)
    if problem := s3_storage_problem(cfg):
        problems.append(problem)
    plan = None
    if train is not None:
        try:
            plan = plan_for(cfg, train)
        except ValueError as e:
            problems.append(
                f"data.train_uri: {e} (finetune.batch_size={ft.batch_size}, {cfg.train.num_workers} workers)"
            )
    if problems:
        raise ConfigError(problems)
    assert plan is not None and encoder is not None and mv is not None
    num_classes = len(train.class_names) or max(labels_of(train)) + 1
    arch = classifier_architecture(encoder.mae_architecture, num_classes, blocks=ft.blocks, drop_path=ft.drop_path)
    arch["class_names"] = list(train.class_names)
    state = None if ft.from_scratch else {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return FinetuneInputs(
        train, val, plan, arch, state, f"models:/{mv.name}/{mv.version}", mv.name, int(mv.version), mv.run_id, amp
    )
