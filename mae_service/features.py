"""Embeddings of uint8 images from an in-memory encoder: the features k-NN and linear probes read.

Pure module (torch + timm, no Ray, no MLflow), used by the trainer's in-training k-NN evaluation and by the
Ray Data feature extraction of ``mae-service eval``. The embedding of an image is the one the registered
encoder computes (``mae_service/tracking/encoder_pyfunc.py`` and :func:`mae_service.tracking.load_encoder`):
ImageNet normalisation, then the ViT's pooled output (for MAE encoders: the mean of the final-normed patch
tokens, ``global_pool="avg"`` with ``fc_norm=False``).

Shapes: ``N`` images, ``L`` patches, ``D`` feature width.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mae_service.evaluation import knn_top1
from mae_service.model import normalize

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_mae(model: nn.Module) -> bool:
    return hasattr(model, "encoder_state_dict_timm") and hasattr(model, "timm_architecture")


def encoder_from_mae(model: nn.Module) -> nn.Module:
    """A timm ``VisionTransformer`` (``num_classes=0``) holding a copy of the MAE's encoder weights, in eval mode."""
    import timm

    model = unwrap(model)
    if not is_mae(model):
        raise ValueError(f"encoder_from_mae needs a MaskedAutoencoder, got {type(model).__name__}")
    name, kwargs = model.timm_architecture()
    encoder = timm.create_model(name, pretrained=False, **kwargs)
    encoder.load_state_dict({k: v.cpu() for k, v in model.encoder_state_dict_timm().items()}, strict=True)
    return encoder.eval()


def _image_size(model: nn.Module) -> tuple[int, int] | None:
    size = getattr(model, "img_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _pool(tokens: Tensor, timm_kwargs: dict[str, Any]) -> Tensor:
    """What timm's ``forward_head(pre_logits=True)`` returns for these tokens (final norm already applied):
    the class token (``global_pool="token"``) or the mean of the patch tokens (``"avg"`` with ``fc_norm=False``)."""
    pool = timm_kwargs.get("global_pool", "token")
    if pool == "token":
        return tokens[:, 0]
    if pool == "avg" and timm_kwargs.get("fc_norm") is False:
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"unsupported pooling global_pool={pool!r}, fc_norm={timm_kwargs.get('fc_norm')!r}: "
                     "allowed token, or avg with fc_norm=False")


def _as_uint8_images(imgs: Any) -> Tensor:
    if isinstance(imgs, Tensor):
        t = imgs
    else:
        arr = np.ascontiguousarray(imgs)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # Ray hands out read-only arrays
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {t.dtype} {list(t.shape)}")
    return t


def embed(model: nn.Module, imgs: Any) -> Tensor:
    """uint8 ``[N, 3, H, W]`` (tensor or array) → float32 embeddings ``[N, D]`` on the CPU.

    ``model`` is a :class:`~mae_service.model.MaskedAutoencoder` (possibly DDP-wrapped; the encoder runs on
    all patches, no masking) or a timm ViT with ``num_classes=0``. Images of another size than the model's
    are resized (bilinear, antialiased). Runs on the model's device without gradients, in eval mode
    (the model's train/eval mode is restored afterwards).
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
            if is_mae(model):
                out = _pool(model.forward_features(x), model.timm_architecture()[1])  # tokens [N, 1+L, D]
            else:
                out = model(x)
                if out.ndim != 2:
                    raise ValueError(f"{type(model).__name__} returned shape {list(out.shape)}, expected [N, D] "
                                     "(create timm models with num_classes=0)")
        return out.float().cpu()
    finally:
        model.train(was_training)


def extract_features(model: nn.Module, batches: Iterable[Any], *, batch_size: int = 256) -> Tensor:
    """Embeddings ``[N, D]`` of every image in ``batches`` (uint8 ``[B, 3, H, W]`` tensors or arrays), in order.

    Batches larger than ``batch_size`` are split, so memory stays bounded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be ≥ 1")
    out: list[Tensor] = []
    for batch in batches:
        x = _as_uint8_images(batch)
        for start in range(0, x.shape[0], batch_size):
            out.append(embed(model, x[start:start + batch_size]))
    if not out:
        raise ValueError("extract_features got no images")
    return torch.cat(out)


def extract_labelled_features(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], *, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``(features [N, D], labels [N])`` from batches of ``{"image": uint8 [B, 3, H, W], "label": int [B]}``

    (the columns of :func:`mae_service.data.eval_dataset`; e.g. ``ds.iter_batches(batch_format="numpy")``).
    """
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    for batch in batches:
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"batches must have columns image and label, got {sorted(batch)}")
        feats.append(extract_features(model, [batch["image"]], batch_size=batch_size))
        y = batch["label"]  # np.array copies: Ray hands out read-only arrays
        y = y.to(torch.int64) if isinstance(y, Tensor) else torch.from_numpy(np.array(y, dtype=np.int64))
        labels.append(y.reshape(-1).cpu())
    if not feats:
        raise ValueError("extract_labelled_features got no batches")
    return torch.cat(feats), torch.cat(labels)


def knn_eval(
    model: nn.Module,
    train_batches: Iterable[Mapping[str, Any]],
    val_batches: Iterable[Mapping[str, Any]],
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
) -> float:
    """k-NN top-1 accuracy of ``model``'s embeddings: the in-training evaluation the sweep optimises."""
    xt, yt = extract_labelled_features(model, train_batches, batch_size=batch_size)
    xv, yv = extract_labelled_features(model, val_batches, batch_size=batch_size)
    return knn_top1(xt, yt, xv, yv, k=k, temperature=temperature)
