"""Fixed 2-D sine-cosine position embeddings, as in the MAE paper (and "Attention is all you need" per axis).

For a ``grid_size × grid_size`` patch grid and width ``D`` (a multiple of 4): the first ``D/2`` channels encode the
patch's column index, the last ``D/2`` its row index, each as ``[sin(pos·ω), cos(pos·ω)]`` with
``ω_k = 10000^(-k/(D/4))``, ``k = 0 … D/4-1``. Patches are numbered row-major (the order of ``patchify``). With a
class token, a zero row is put in front. Computed in float64 and returned as float32.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[M] positions → [M, dim]``: ``dim/2`` sines then ``dim/2`` cosines (float64)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width {dim} must be even")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """``[grid_size², dim]`` (or ``[1 + grid_size², dim]`` with a zero class-token row first), float32."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width {dim} must be a multiple of 4")
    idx = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")  # [g, g] each; patch (r, c) is number r*g + c
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # [g², dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.to(torch.float32)
