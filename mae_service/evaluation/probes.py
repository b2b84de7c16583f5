"""Linear probe: a linear classifier trained on frozen features (as in MAE's linear probing).

Pure function of feature matrices and integer labels (torch tensors or numpy arrays); no Ray, no MLflow.
Shapes: ``N`` training samples, ``M`` held-out samples, ``D`` feature width, ``C`` classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mae_service.evaluation.arrays import check_inputs


def linear_probe(
    train_feats: Any,
    train_labels: Any,
    val_feats: Any,
    val_labels: Any,
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
    xt, yt, xv, yv = check_inputs(train_feats, train_labels, val_feats, val_labels)
    mean = xt.mean(dim=0, keepdim=True)
    std = xt.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    num_classes = int(max(yt.max(), yv.max())) + 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation (20x slower on 2 busy cores)
    try:
        head = _train_head(
            xt, yt, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed
        )
        with torch.no_grad():
            pred = head(xv).argmax(dim=1)
        return float((pred == yv).float().mean())
    finally:
        torch.set_num_threads(threads)


def _train_head(
    xt: Tensor, yt: Tensor, num_classes: int, *, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int
) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * math.ceil(xt.shape[0] / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(xt.shape[0], generator=gen)
        for start in range(0, xt.shape[0], batch_size):
            idx = order[start : start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head
