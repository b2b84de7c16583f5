"""Weighted k-nearest-neighbour accuracy on frozen features (as in DINO), and the in-training k-NN evaluation.

:func:`knn_top1` is a pure function of feature matrices and integer labels (torch tensors or numpy arrays).
:func:`knn_metrics` is what the trainer runs on rank 0 every ``train.eval_every_steps`` (the sweep objective):
the model's embeddings (:func:`~mae_service.evaluation.features.embed`) of deterministic centre crops of a
labelled subset of the training data and of the held-out data. No MLflow.

Shapes: ``N`` training samples, ``M`` held-out samples, ``D`` feature width, ``C`` classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mae_service.evaluation.arrays import check_inputs
from mae_service.evaluation.features import extract_labelled_features


def knn_top1(
    train_feats: Any,
    train_labels: Any,
    val_feats: Any,
    val_labels: Any,
    k: int = 20,
    temperature: float = 0.07,
    *,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (in [0, 1]) of a weighted k-nearest-neighbour classifier on L2-normalised features.

    Each held-out sample votes over its ``k`` most cosine-similar training samples, each neighbour weighing
    ``exp(similarity / temperature)`` for its class (Wu et al. 2018, as in DINO's k-NN evaluation). ``k`` larger
    than the training set uses every training sample. Ties in the vote go to the lower class id.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer ≥ 1")
    if not isinstance(temperature, int | float) or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature!r}: must be a positive number")
    xt, yt, xv, yv = check_inputs(train_feats, train_labels, val_feats, val_labels)
    xt = torch.nn.functional.normalize(xt, dim=1)  # [N, D]
    xv = torch.nn.functional.normalize(xv, dim=1)  # [M, D]
    k = min(k, xt.shape[0])
    num_classes = int(max(yt.max(), yv.max())) + 1
    correct = 0
    for start in range(0, xv.shape[0], chunk_size):
        sim = xv[start : start + chunk_size] @ xt.T  # [m, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()  # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, yt[top_idx], weights)  # [m, C]
        correct += int((votes.argmax(dim=1) == yv[start : start + chunk_size]).sum())
    return correct / xv.shape[0]


def _encode(
    model: nn.Module, dataset: Any, *, batch_size: int = 128, limit: int | None = None, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """``(features [N, D], labels [N])`` of a Ray Dataset with columns ``image`` (uint8) and ``label``; the model
    runs on its own device, in eval mode without gradients, under autocast ``dtype``."""
    if limit is not None:
        dataset = dataset.limit(limit)
    batches = dataset.iter_torch_batches(batch_size=batch_size)
    return extract_labelled_features(model, batches, batch_size=batch_size, dtype=dtype)


def knn_metrics(model: nn.Module, spec: dict[str, Any], *, dtype: torch.dtype | None = None) -> dict[str, float]:
    """``{"knn_top1": …}`` of ``model`` (an MAE, possibly wrapped) on ``spec``'s sources, or ``{}`` when either
    side has no labelled images.

    ``spec``: ``train_source`` and ``val_source`` (:class:`mae_service.data.Source`), ``image_size``, ``k`` and
    ``max_train`` (training images used, None for all). ``dtype``: the run's autocast (None: fp32).
    """
    from mae_service.data import eval_dataset

    size = spec["image_size"]
    tr_x, tr_y = _encode(
        model, eval_dataset(spec["train_source"], image_size=size), limit=spec["max_train"], dtype=dtype
    )
    va_x, va_y = _encode(model, eval_dataset(spec["val_source"], image_size=size), dtype=dtype)
    keep_t, keep_v = tr_y >= 0, va_y >= 0
    if keep_t.sum() == 0 or keep_v.sum() == 0:
        return {}
    return {"knn_top1": float(knn_top1(tr_x[keep_t], tr_y[keep_t], va_x[keep_v], va_y[keep_v], k=spec["k"]))}
