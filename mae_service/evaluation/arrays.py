"""Checks shared by the classifiers: feature matrices and integer labels, as CPU tensors.

Shapes: ``N`` training samples, ``M`` held-out samples, ``D`` feature width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def as_features(x: Any, what: str) -> Tensor:
    """``x`` (tensor or array) as a finite, non-empty float32 CPU matrix ``[samples, features]``."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array [samples, features], got shape {list(t.shape)}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains non-finite values")
    return t


def as_labels(y: Any, n: int, what: str) -> Tensor:
    """``y`` as ``n`` int64 class ids ≥ 0 on the CPU."""
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).detach().cpu()
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must be a 1-D array of {n} labels (one per feature row), got shape {list(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"{what} must hold integer class ids, got non-integer values")
    t = t.to(torch.int64)
    if (t < 0).any():
        raise ValueError(f"{what} must hold class ids ≥ 0, got {int(t.min())}")
    return t


def check_inputs(train_feats: Any, train_labels: Any, val_feats: Any, val_labels: Any) -> tuple[Tensor, ...]:
    """``(xt [N, D], yt [N], xv [M, D], yv [M])`` checked and converted; ValueError naming the bad argument."""
    xt = as_features(train_feats, "train_feats")
    xv = as_features(val_feats, "val_feats")
    if xt.shape[1] != xv.shape[1]:
        raise ValueError(f"train_feats has {xt.shape[1]} features per row but val_feats has {xv.shape[1]}")
    yt = as_labels(train_labels, xt.shape[0], "train_labels")
    yv = as_labels(val_labels, xv.shape[0], "val_labels")
    return xt, yt, xv, yv
