"""Evaluate a registered encoder on labelled data and record the score on the version that was scored.

``evaluate_model`` is what ``mae-service eval knn`` and ``jobs/evaluate.py`` run: it resolves the model URI once
(an alias may move while the evaluation runs: the pinned ``models:/NAME/VERSION`` is what gets loaded and what
gets the score), loads the encoder (checksums verified), embeds the train and held-out sets with Ray Data actors
(:func:`mae_service.evaluation.splits_features`, so large sets stream through the cluster), scores them with
k-NN and a linear probe (:mod:`mae_service.evaluation`), logs an MLflow run and tags the model version.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from mae_service.tracking.register import DEFAULT_EVAL_EXPERIMENT, record_eval
from mae_service.tracking.registry import check_encoder, load_encoder, pinned_uri, resolve

logger = logging.getLogger(__name__)


def _labelled(feats: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    keep = labels >= 0
    if not keep.any():
        raise ValueError(f"{what} has no labelled images (class folders / label column give labels)")
    return feats[keep], labels[keep]


def _check_labelled(src: Any) -> None:
    """ValueError, before any Ray work, for a source whose listing shows it has no labels at all (loose files
    outside class folders, Parquet without a label column); wds labels are inside the shards: checked later."""
    no_labels = (src.fmt == "files" and all((s.labels < 0).all() for s in src.shards)) or (
        src.fmt == "parquet" and src.label_column is None
    )
    if no_labels:
        raise ValueError(
            f"{src.uri!r} has {src.num_images} images and no labels: the evaluation needs labelled images — class "
            "folders (ROOT/CLASS/IMAGE) for data.format=files, a label column for parquet, .cls members for wds"
        )


def _random_twin(encoder: Any) -> Any:
    """The same architecture with (seeded) random weights: what pretraining must beat."""
    import timm
    import torch

    arch = encoder.mae_architecture
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rand: Any = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
    rand.mae_architecture = arch
    return rand.eval()


def _features(
    encoders: list[Any],
    data_uris: list[str],
    *,
    fmt: str,
    image_size: int,
    s3_endpoint: str | None,
    batch_size: int,
    concurrency: int,
    amp: str,
) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """Per data URI, ``([features of each encoder], labels)``: one Ray Data pass (Ray started or joined here)."""
    from mae_service.data import eval_dataset, open_source
    from mae_service.evaluation import splits_features
    from mae_service.runtime import init_ray

    sources = [open_source(u, fmt, s3_endpoint=s3_endpoint) for u in data_uris]
    for src in sources:
        _check_labelled(src)
    logger.info("embedding %s images", " / ".join(f"{s.num_images} {u}" for s, u in zip(sources, data_uris)))
    init_ray()
    return splits_features(
        [eval_dataset(s, image_size=image_size) for s in sources],
        encoders,
        batch_size=batch_size,
        concurrency=concurrency,
        amp=amp,
    )


def _amp(amp: str) -> str:
    """``amp`` resolved on this CPU (what the embedding actors resolve on theirs), checked before any Ray work."""
    from mae_service.model.precision import amp_name, resolve_amp

    return amp_name(resolve_amp(amp, "cpu"))


def _score(
    splits: list[tuple[list[np.ndarray], np.ndarray]],
    train_uri: str,
    val_uri: str,
    *,
    k: int,
    temperature: float,
    linear_probe: bool,
) -> dict[str, float]:
    """k-NN (and linear-probe) top-1 of each encoder's features; the second encoder's get ``_random_init``."""
    from mae_service.evaluation import knn_top1
    from mae_service.evaluation import linear_probe as probe

    (train_feats, yt), (val_feats, yv) = splits
    metrics: dict[str, float] = {}
    for j, suffix in enumerate(["", "_random_init"][: len(train_feats)]):
        xt, yt_ = _labelled(train_feats[j], yt, train_uri)
        xv, yv_ = _labelled(val_feats[j], yv, val_uri)
        metrics[f"knn_top1{suffix}"] = knn_top1(xt, yt_, xv, yv_, k=k, temperature=temperature)
        if linear_probe:
            metrics[f"linear_probe_top1{suffix}"] = probe(xt, yt_, xv, yv_)
        metrics.setdefault("num_train", float(len(yt_)))
        metrics.setdefault("num_val", float(len(yv_)))
    return metrics


def evaluate_model(
    model_uri: str,
    train_uri: str,
    val_uri: str,
    *,
    fmt: str = "files",
    image_size: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    linear_probe: bool = True,
    random_baseline: bool = False,
    batch_size: int = 64,
    concurrency: int = 1,
    s3_endpoint: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    record: bool = True,
    amp: str = "auto",
) -> dict[str, float]:
    """k-NN top-1 (and linear-probe top-1) of the registered encoder ``model_uri`` on labelled data.

    ``image_size`` defaults to the encoder's. With ``random_baseline`` the same architecture with random
    weights is scored too (``*_random_init`` metrics): pretraining should beat it. With ``record`` the metrics
    go to an MLflow run in ``experiment`` and onto the tags of the version that was scored (see
    :func:`~mae_service.tracking.record_eval`), even when ``model_uri``'s alias has moved meanwhile. ``amp``: the
    embeddings' autocast, a ``train.amp`` mode (``auto``: bf16 on CPUs with native bf16), recorded as ``amp``.
    (Over 60 lines only by its keyword signature and the formatted call lists; the steps are five.)
    """
    t0 = time.monotonic()
    amp_resolved = _amp(amp)  # a bad or unsupported mode fails here, before the registry or Ray
    client, uri, mv = resolve(model_uri, tracking_uri)  # the one alias lookup: load and record this version
    check_encoder(client, mv, model_uri)
    pinned = pinned_uri(mv)
    encoder: Any = load_encoder(pinned, tracking_uri=uri)
    size = image_size or int(encoder.mae_architecture["image_size"])
    encoders = [encoder, _random_twin(encoder)] if random_baseline else [encoder]
    logger.info("evaluating %s (%s) at %dpx, embeddings in %s", model_uri, pinned, size, amp_resolved)
    splits = _features(
        encoders,
        [train_uri, val_uri],
        fmt=fmt,
        image_size=size,
        s3_endpoint=s3_endpoint,
        batch_size=batch_size,
        concurrency=concurrency,
        amp=amp,
    )
    metrics = _score(splits, train_uri, val_uri, k=k, temperature=temperature, linear_probe=linear_probe)
    metrics["eval_seconds"] = round(time.monotonic() - t0, 3)
    if record:
        params = {
            "train_data": train_uri,
            "val_data": val_uri,
            "format": fmt,
            "image_size": size,
            "k": k,
            "temperature": temperature,
            "amp": amp_resolved,
        }
        run_id = record_eval(
            pinned,
            metrics,
            tracking_uri=uri,
            experiment=experiment or DEFAULT_EVAL_EXPERIMENT,
            params=params,
            asked_uri=model_uri,
        )
        logger.info("recorded the evaluation of %s as MLflow run %s", pinned, run_id)
    return metrics
