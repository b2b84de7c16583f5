"""Evaluate a registered encoder on labelled data: features on Ray Data, then k-NN and a linear probe.

``evaluate_model`` is what ``mae-service eval knn`` and ``jobs/evaluate.py`` run: it loads the encoder from the
registry (checksums verified), embeds the train and held-out sets with Ray Data actors (so large sets stream
through the cluster), scores them with :mod:`mae_service.evaluation`, logs an MLflow run and records the
metrics as tags on the model version.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def init_ray() -> None:
    """Attach to the cluster (``RAY_ADDRESS``, or inside a Ray job) or start a local Ray on loopback."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ray.init(num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1", include_dashboard=False,
             object_store_memory=min(2 << 30, int(os.environ.get("MAE_OBJECT_STORE_BYTES", 1 << 30))))


class _Embedder:
    """Ray Data actor: builds the encoders once, then embeds ``image`` batches with each (``feature_<i>``),
    passing the other columns (``label``, ``split``) through."""

    def __init__(self, archs: list[tuple[str, dict[str, Any]]], states: list[Any]):
        import ray
        import timm
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.encoders = []
        for (timm_name, timm_kwargs), state in zip(archs, states, strict=True):
            if isinstance(state, ray.ObjectRef):
                state = ray.get(state)
            encoder = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
            encoder.load_state_dict(state, strict=True)
            self.encoders.append(encoder.eval())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mae_service.features import embed

        out = {k: v for k, v in batch.items() if k != "image"}
        for i, encoder in enumerate(self.encoders):
            out[f"feature_{i}"] = embed(encoder, batch["image"]).numpy()
        return out


def _add_split(batch: dict[str, np.ndarray], split: int) -> dict[str, np.ndarray]:
    batch["split"] = np.full(len(batch["label"]), split, np.int64)
    return batch


def dataset_features(ds: Any, encoder: Any, *, batch_size: int = 64, concurrency: int = 1,
                     num_cpus: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] float32, labels [N] int64)`` of a Ray Dataset with columns ``image`` (uint8
    ``[3, H, W]``) and ``label``, embedded in Ray Data actors by ``encoder``: a MaskedAutoencoder or a timm ViT
    from :func:`~mae_service.tracking.load_encoder`.

    The encoder's weights go to the object store once; ``concurrency`` actors embed in parallel. Rows keep
    their label, so the result does not depend on the order Ray returns blocks in.
    """
    (feats,), labels = splits_features([ds], [encoder], batch_size=batch_size, concurrency=concurrency,
                                       num_cpus=num_cpus)[0]
    return feats, labels


def splits_features(datasets: list[Any], encoders: list[Any], *, batch_size: int = 64, concurrency: int = 1,
                    num_cpus: float = 1.0) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """Embed several datasets (e.g. train and held-out) with several encoders in ONE Ray Data pass: every image is
    read and decoded once. Returns, per dataset, ``([features of encoder 0, encoder 1, …], labels)``."""
    import ray
    import ray.data

    archs, states = [], []
    for enc in encoders:
        name, kwargs, state = _architecture(enc)
        archs.append((name, kwargs))
        states.append(ray.put(state))
    tagged = [ds.map_batches(_add_split, fn_kwargs={"split": i}, batch_format="numpy") for i, ds in enumerate(datasets)]
    ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    out = ds.map_batches(_Embedder, fn_constructor_kwargs={"archs": archs, "states": states},
                         batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                         compute=ray.data.ActorPoolStrategy(size=concurrency))
    parts: list[dict[str, list[np.ndarray]]] = [{"label": [], **{f"feature_{j}": [] for j in range(len(encoders))}}
                                                for _ in datasets]
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        split = np.asarray(batch["split"])
        for i, part in enumerate(parts):
            rows = split == i
            if rows.any():
                part["label"].append(np.asarray(batch["label"], dtype=np.int64).reshape(-1)[rows])
                for j in range(len(encoders)):
                    part[f"feature_{j}"].append(np.asarray(batch[f"feature_{j}"], dtype=np.float32)[rows])
    result = []
    for i, part in enumerate(parts):
        if not part["label"]:
            raise ValueError(f"dataset {i} has no images")
        result.append(([np.concatenate(part[f"feature_{j}"]) for j in range(len(encoders))],
                       np.concatenate(part["label"])))
    return result


def _architecture(model: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(timm name, timm kwargs, CPU state dict)`` of a MaskedAutoencoder or of an encoder from
    :func:`~mae_service.tracking.load_encoder` (which records its architecture as ``.mae_architecture``)."""
    from mae_service.features import is_mae, unwrap

    model = unwrap(model)
    if is_mae(model):
        name, kwargs = model.timm_architecture()
        state = model.encoder_state_dict_timm()
    elif isinstance(getattr(model, "mae_architecture", None), dict):
        name, kwargs = model.mae_architecture["timm_name"], model.mae_architecture["timm_kwargs"]
        state = model.state_dict()
    else:
        raise ValueError(f"dataset_features needs a MaskedAutoencoder or an encoder from load_encoder, "
                         f"got {type(model).__name__}")
    return name, dict(kwargs), {k: v.detach().cpu() for k, v in state.items()}


def _labelled(feats: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    keep = labels >= 0
    if not keep.any():
        raise ValueError(f"{what} has no labelled images (class folders / label column give labels)")
    return feats[keep], labels[keep]


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
) -> dict[str, float]:
    """k-NN top-1 (and linear-probe top-1) of the registered encoder ``model_uri`` on labelled data.

    ``image_size`` defaults to the encoder's. With ``random_baseline`` the same architecture with random
    weights is scored too (``*_random_init`` metrics): pretraining should beat it. With ``record`` the metrics
    go to an MLflow run in ``experiment`` and onto the model version's tags (see :func:`record_eval`).
    """
    import timm
    import torch

    from mae_service.data import eval_dataset, open_source
    from mae_service.evaluation import knn_top1
    from mae_service.evaluation import linear_probe as probe
    from mae_service.tracking.registry import DEFAULT_EVAL_EXPERIMENT, load_encoder, record_eval

    t0 = time.monotonic()
    encoder = load_encoder(model_uri, tracking_uri=tracking_uri)
    native = int(encoder.patch_embed.img_size[0])
    size = image_size or native
    src_train = open_source(train_uri, fmt, s3_endpoint=s3_endpoint)
    src_val = open_source(val_uri, fmt, s3_endpoint=s3_endpoint)
    logger.info("evaluating %s on %d train / %d held-out images at %dpx", model_uri, src_train.num_images,
                src_val.num_images, size)
    init_ray()

    encoders = [encoder]
    if random_baseline:  # the same architecture, random weights: what pretraining must beat
        arch = encoder.mae_architecture
        with torch.random.fork_rng():
            torch.manual_seed(0)
            rand = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
        rand.mae_architecture = arch
        encoders.append(rand.eval())
    (train_feats, yt), (val_feats, yv) = splits_features(
        [eval_dataset(src_train, image_size=size), eval_dataset(src_val, image_size=size)], encoders,
        batch_size=batch_size, concurrency=concurrency)
    metrics: dict[str, float] = {}
    for j, suffix in enumerate(["", "_random_init"][: len(encoders)]):
        xt, yt_ = _labelled(train_feats[j], yt, train_uri)
        xv, yv_ = _labelled(val_feats[j], yv, val_uri)
        metrics[f"knn_top1{suffix}"] = knn_top1(xt, yt_, xv, yv_, k=k, temperature=temperature)
        if linear_probe:
            metrics[f"linear_probe_top1{suffix}"] = probe(xt, yt_, xv, yv_)
        metrics.setdefault("num_train", float(len(yt_)))
        metrics.setdefault("num_val", float(len(yv_)))
    metrics["eval_seconds"] = round(time.monotonic() - t0, 3)
    if record:
        run_id = record_eval(model_uri, metrics, tracking_uri=tracking_uri,
                             experiment=experiment or DEFAULT_EVAL_EXPERIMENT,
                             params={"train_data": train_uri, "val_data": val_uri, "format": fmt, "image_size": size,
                                     "k": k, "temperature": temperature})
        logger.info("recorded the evaluation of %s as MLflow run %s", model_uri, run_id)
    return metrics
