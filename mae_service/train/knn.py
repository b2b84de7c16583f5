"""k-NN accuracy of the encoder during training (the sweep objective), computed on rank 0.

Features: the registered timm encoder's pooled output (:func:`mae_service.features.embed`), on
deterministic centre crops of a labelled subset of the training data and of the held-out data.
"""

from __future__ import annotations

from typing import Any

import torch

from mae_service.features import extract_labelled_features


def encode(model: torch.nn.Module, dataset, *, batch_size: int = 128,
           limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N,D], labels [N]) of a Ray Data dataset with columns image (uint8) and label; the model runs
    on its own device, in eval mode without gradients (:func:`~mae_service.features.embed`)."""
    if limit is not None:
        dataset = dataset.limit(limit)
    return extract_labelled_features(model, dataset.iter_torch_batches(batch_size=batch_size), batch_size=batch_size)


def knn_metrics(model: torch.nn.Module, spec: dict[str, Any]) -> dict[str, float]:
    from mae_service.data import eval_dataset
    from mae_service.evaluation import knn_top1

    size = spec["image_size"]
    tr_x, tr_y = encode(model, eval_dataset(spec["train_source"], image_size=size), limit=spec["max_train"])
    va_x, va_y = encode(model, eval_dataset(spec["val_source"], image_size=size))
    keep = tr_y >= 0
    if keep.sum() == 0 or (va_y >= 0).sum() == 0:
        return {}
    return {"knn_top1": float(knn_top1(tr_x[keep], tr_y[keep], va_x[va_y >= 0], va_y[va_y >= 0], k=spec["k"]))}
