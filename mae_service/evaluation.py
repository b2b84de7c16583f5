"""Frozen-feature evaluation of an encoder: weighted k-NN (as in DINO) and a linear probe.

Pure functions of feature matrices and integer labels (torch tensors or numpy arrays); no Ray, no MLflow.
Shapes: ``N`` training samples, ``M`` held-out samples, ``D`` feature width, ``C`` classes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def _as_features(x, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array [samples, features], got shape {list(t.shape)}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains non-finite values")
    return t


def _as_labels(y, n: int, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).detach().cpu()
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must be a 1-D array of {n} labels (one per feature row), got shape {list(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"{what} must hold integer class ids, got non-integer values")
    t = t.to(torch.int64)
    if (t < 0).any():
        raise ValueError(f"{what} must hold class ids ≥ 0, got {int(t.min())}")
    return t


def _check_inputs(train_feats, train_labels, val_feats, val_labels) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xt = _as_features(train_feats, "train_feats")
    xv = _as_features(val_feats, "val_feats")
    if xt.shape[1] != xv.shape[1]:
        raise ValueError(f"train_feats has {xt.shape[1]} features per row but val_feats has {xv.shape[1]}")
    yt = _as_labels(train_labels, xt.shape[0], "train_labels")
    yv = _as_labels(val_labels, xv.shape[0], "val_labels")
    return xt, yt, xv, yv


def knn_top1(
    train_feats,
    train_labels,
    val_feats,
    val_labels,
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
    xt, yt, xv, yv = _check_inputs(train_feats, train_labels, val_feats, val_labels)
    xt = torch.nn.functional.normalize(xt, dim=1)  # [N, D]
    xv = torch.nn.functional.normalize(xv, dim=1)  # [M, D]
    k = min(k, xt.shape[0])
    num_classes = int(max(yt.max(), yv.max())) + 1
    correct = 0
    for start in range(0, xv.shape[0], chunk_size):
        sim = xv[start:start + chunk_size] @ xt.T  # [m, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()  # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, yt[top_idx], weights)  # [m, C]
        correct += int((votes.argmax(dim=1) == yv[start:start + chunk_size]).sum())
    return correct / xv.shape[0]


def linear_probe(
    train_feats,
    train_labels,
    val_feats,
    val_labels,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (in [0, 1]) of a linear classifier trained on frozen features.

    As in MAE's linear probing, features are standardised with the training set's per-dimension mean and
    standard deviation (a BatchNorm without affine parameters, frozen after training) before one linear layer.
    Training: SGD with momentum 0.9 and a cosine learning-rate decay over ``epochs`` passes of shuffled
    mini-batches; deterministic for a given ``seed``.
    """
    for key, val in dict(epochs=epochs, batch_size=batch_size).items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key}={val!r}: must be an integer ≥ 1")
    if not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"lr={lr!r}: must be a positive number")
    if not isinstance(weight_decay, int | float) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r}: must be ≥ 0")
    xt, yt, xv, yv = _check_inputs(train_feats, train_labels, val_feats, val_labels)
    mean = xt.mean(dim=0, keepdim=True)
    std = xt.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    num_classes = int(max(yt.max(), yv.max())) + 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation (20x slower on 2 busy cores)
    try:
        return _train_probe(xt, yt, xv, yv, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
                            batch_size=batch_size, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _train_probe(xt: Tensor, yt: Tensor, xv: Tensor, yv: Tensor, num_classes: int, *, epochs: int, lr: float,
                 weight_decay: float, batch_size: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(xt.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(xt.shape[0], generator=gen)
        for start in range(0, xt.shape[0], batch_size):
            idx = order[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        pred = head(xv).argmax(dim=1)
    return float((pred == yv).float().mean())
