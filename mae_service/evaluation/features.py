"""Embeddings of uint8 images: by an in-memory encoder, or over whole Ray Datasets in Ray Data actors.

The embedding of an image is the one the registered encoder computes (``mae_service/tracking/encoder_pyfunc.py``
and :func:`mae_service.tracking.load_encoder`): ImageNet normalisation, then the ViT's pooled output (for MAE
encoders: the mean of the final-normed patch tokens, ``global_pool="avg"`` with ``fc_norm=False``).

:func:`embed`, :func:`extract_features` and :func:`extract_labelled_features` are pure torch (the trainer's
in-training k-NN uses them); :func:`splits_features` embeds datasets on the cluster (what ``mae-service eval``
runs). No MLflow.

Shapes: ``N`` images, ``L`` patches, ``D`` feature width.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mae_service.model import normalize
from mae_service.model.export import is_mae, unwrap
from mae_service.model.precision import autocast, resolve_amp


# ---- one model, in memory ------------------------------------------------------------------------------------
def _image_size(model: nn.Module) -> tuple[int, int] | None:
    size = getattr(model, "img_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _pool(tokens: Tensor, timm_kwargs: dict[str, Any]) -> Tensor:
    """What timm's ``forward_head(pre_logits=True)`` returns for these tokens (final norm already applied):
    the class token (``global_pool="token"``) or the mean of the patch tokens (``"avg"`` with ``fc_norm=False``)."""
    pool = timm_kwargs.get("global_pool", "token")
    if pool == "token":
        return tokens[:, 0]
    if pool == "avg" and timm_kwargs.get("fc_norm") is False:
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(
        f"unsupported pooling global_pool={pool!r}, fc_norm={timm_kwargs.get('fc_norm')!r}: "
        "allowed token, or avg with fc_norm=False"
    )


def _as_uint8_images(imgs: Any) -> Tensor:
    if isinstance(imgs, Tensor):
        t = imgs
    else:
        arr = np.ascontiguousarray(imgs)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # Ray hands out read-only arrays
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {t.dtype} {list(t.shape)}")
    return t


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """Pooled features ``[N, D]`` of normalised images ``x`` at the model's size."""
    if is_mae(model):
        return _pool(model.forward_features(x), model.timm_architecture()[1])  # tokens [N, 1+L, D]
    out = model(x)
    if out.ndim != 2:
        raise ValueError(
            f"{type(model).__name__} returned shape {list(out.shape)}, expected [N, D] "
            "(create timm models with num_classes=0)"
        )
    return out


def embed(model: nn.Module, imgs: Any, *, dtype: torch.dtype | None = None) -> Tensor:
    """uint8 ``[N, 3, H, W]`` (tensor or array) → float32 embeddings ``[N, D]`` on the CPU.

    ``model`` is a :class:`~mae_service.model.MaskedAutoencoder` (possibly DDP-wrapped; the encoder runs on
    all patches, no masking) or a timm ViT with ``num_classes=0``. Images of another size than the model's
    are resized (bilinear, antialiased). Runs on the model's device without gradients, in eval mode
    (the model's train/eval mode is restored afterwards), the encoder under autocast ``dtype``
    (:func:`mae_service.model.precision.resolve_amp`; None: fp32).
    """
    model = unwrap(model)
    x = _as_uint8_images(imgs)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = normalize(x.to(device, non_blocking=True))
            size = _image_size(model)
            if size is not None and tuple(x.shape[-2:]) != size:
                x = nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            with autocast(dtype, device):
                feats = _forward(model, x)
            return feats.float().cpu()
    finally:
        model.train(was_training)


def extract_features(
    model: nn.Module, batches: Iterable[Any], *, batch_size: int = 256, dtype: torch.dtype | None = None
) -> Tensor:
    """Embeddings ``[N, D]`` of every image in ``batches`` (uint8 ``[B, 3, H, W]`` tensors or arrays), in order.

    Batches larger than ``batch_size`` are split, so memory stays bounded. ``dtype``: autocast, as in :func:`embed`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be ≥ 1")
    out: list[Tensor] = []
    for batch in batches:
        x = _as_uint8_images(batch)
        for start in range(0, x.shape[0], batch_size):
            out.append(embed(model, x[start : start + batch_size], dtype=dtype))
    if not out:
        raise ValueError("extract_features got no images")
    return torch.cat(out)


def extract_labelled_features(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], *, batch_size: int = 256, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(features [N, D], labels [N])`` from batches of ``{"image": uint8 [B, 3, H, W], "label": int [B]}``

    (the columns of :func:`mae_service.data.eval_dataset`; e.g. ``ds.iter_batches(batch_format="numpy")``).
    """
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    for batch in batches:
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"batches must have columns image and label, got {sorted(batch)}")
        feats.append(extract_features(model, [batch["image"]], batch_size=batch_size, dtype=dtype))
        y = batch["label"]  # np.array copies: Ray hands out read-only arrays
        y = y.to(torch.int64) if isinstance(y, Tensor) else torch.from_numpy(np.array(y, dtype=np.int64))
        labels.append(y.reshape(-1).cpu())
    if not feats:
        raise ValueError("extract_labelled_features got no batches")
    return torch.cat(feats), torch.cat(labels)


# ---- datasets, on Ray Data -----------------------------------------------------------------------------------
class _Embedder:
    """Ray Data actor: builds the encoders once, then embeds ``image`` batches with each (``feature_<i>``),
    passing the other columns (``label``, ``split``) through. ``amp`` is resolved here, on the actor's CPU."""

    def __init__(self, archs: list[tuple[str, dict[str, Any]]], states: list[Any], amp: str = "none"):
        import ray
        import timm

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.dtype = resolve_amp(amp, "cpu")
        self.encoders = []
        for (timm_name, timm_kwargs), state in zip(archs, states, strict=True):
            if isinstance(state, ray.ObjectRef):
                state = ray.get(state)
            encoder = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
            encoder.load_state_dict(state, strict=True)
            self.encoders.append(encoder.eval())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "image"}
        for i, encoder in enumerate(self.encoders):
            out[f"feature_{i}"] = embed(encoder, batch["image"], dtype=self.dtype).numpy()
        return out


def _add_split(batch: dict[str, np.ndarray], split: int) -> dict[str, np.ndarray]:
    batch["split"] = np.full(len(batch["label"]), split, np.int64)
    return batch


def _architecture(model: nn.Module) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """``(timm name, timm kwargs, CPU state dict)`` of a MaskedAutoencoder or of an encoder from
    :func:`~mae_service.tracking.load_encoder` (which records its architecture as ``.mae_architecture``)."""
    model = unwrap(model)
    arch = getattr(model, "mae_architecture", None)
    if is_mae(model):
        name, kwargs = model.timm_architecture()
        state = model.encoder_state_dict_timm()
    elif isinstance(arch, dict):
        name, kwargs = arch["timm_name"], arch["timm_kwargs"]
        state = model.state_dict()
    else:
        raise ValueError(
            f"splits_features needs MaskedAutoencoders or encoders from load_encoder, got {type(model).__name__}"
        )
    return name, dict(kwargs), {k: v.detach().cpu() for k, v in state.items()}


def _collect(out: Any, num_datasets: int, num_encoders: int) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """Regroup the embedded rows by their ``split`` column: rows keep their label, so the result does not depend
    on the order Ray returns blocks in."""
    parts: list[dict[str, list[np.ndarray]]] = [
        {"label": [], **{f"feature_{j}": [] for j in range(num_encoders)}} for _ in range(num_datasets)
    ]
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        split = np.asarray(batch["split"])
        for i, part in enumerate(parts):
            rows = split == i
            if rows.any():
                part["label"].append(np.asarray(batch["label"], dtype=np.int64).reshape(-1)[rows])
                for j in range(num_encoders):
                    part[f"feature_{j}"].append(np.asarray(batch[f"feature_{j}"], dtype=np.float32)[rows])
    result = []
    for i, part in enumerate(parts):
        if not part["label"]:
            raise ValueError(f"dataset {i} has no images")
        feats = [np.concatenate(part[f"feature_{j}"]) for j in range(num_encoders)]
        result.append((feats, np.concatenate(part["label"])))
    return result


def splits_features(
    datasets: list[Any],
    encoders: list[nn.Module],
    *,
    batch_size: int = 64,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    amp: str = "none",
) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """Embed several Ray Datasets (e.g. train and held-out; columns ``image`` uint8 ``[3, H, W]`` and ``label``)
    with several encoders in ONE Ray Data pass: every image is read and decoded once. Returns, per dataset,
    ``([features [N, D] float32 of encoder 0, encoder 1, …], labels [N] int64)``.

    Encoders: MaskedAutoencoders or timm ViTs from :func:`~mae_service.tracking.load_encoder`. Their weights go to
    the object store once; ``concurrency`` actors (``num_cpus`` each) embed in parallel, under the autocast that
    ``amp`` (a ``train.amp`` mode) resolves to on each actor's CPU.
    """
    import ray
    import ray.data

    archs, states = [], []
    for enc in encoders:
        name, kwargs, state = _architecture(enc)
        archs.append((name, kwargs))
        states.append(ray.put(state))
    tagged = [ds.map_batches(_add_split, fn_kwargs={"split": i}, batch_format="numpy") for i, ds in enumerate(datasets)]
    ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    out = ds.map_batches(
        _Embedder,
        fn_constructor_kwargs={"archs": archs, "states": states, "amp": amp},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
    )
    return _collect(out, len(datasets), len(encoders))
