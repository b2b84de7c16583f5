"""k-NN accuracy of the encoder during training (the sweep objective), computed on rank 0.

Features: the registered timm encoder's pooled output (:func:`mae_service.features.embed`), on
deterministic centre crops of a labelled subset of the training data and of the held-out data.
"""

from __future__ import annotations

from typing import Any

import torch

from mae_service.features import embed


@torch.no_grad()
def encode(model: torch.nn.Module, dataset, device: torch.device, *, batch_size: int = 128,
           limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N,D], labels [N]) of a Ray Data dataset with columns image (uint8) and label."""
    feats, labels = [], []
    if limit is not None:
        dataset = dataset.limit(limit)
    was_training = model.training
    model.eval()
    try:
        for batch in dataset.iter_torch_batches(batch_size=batch_size):
            feats.append(embed(model, batch["image"].to(device)))
            labels.append(batch["label"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_metrics(model: torch.nn.Module, device: torch.device, spec: dict[str, Any]) -> dict[str, float]:
    from mae_service.data import eval_dataset
    from mae_service.evaluation import knn_top1

    size = spec["image_size"]
    tr_x, tr_y = encode(model, eval_dataset(spec["train_source"], image_size=size), device, limit=spec["max_train"])
    va_x, va_y = encode(model, eval_dataset(spec["val_source"], image_size=size), device)
    keep = tr_y >= 0
    if keep.sum() == 0 or (va_y >= 0).sum() == 0:
        return {}
    return {"knn_top1": float(knn_top1(tr_x[keep], tr_y[keep], va_x[va_y >= 0], va_y[va_y >= 0], k=spec["k"]))}
