"""Reconstruction pictures like the paper's Figure 2: original | masked | reconstruction | reconstruction + visible.

Owns the picture of one batch; pure torch + PIL (imports only :mod:`mae_service.model.mae` and ``.precision``). Used by the trainer
(logged to MLflow every N steps) and by ``mae-service reconstruct`` (:mod:`mae_service.tracking.pictures`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mae_service.model.mae import IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoder, normalize
from mae_service.model.precision import autocast


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised [N,3,H,W] → uint8 [N,H,W,3]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    pix = (x * std + mean).clamp(0, 1) * 255
    return pix.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoder,
    images: torch.Tensor,
    *,
    mask_ratio: float | None = None,
    seed: int = 0,
    max_images: int = 4,
    dtype: torch.dtype | None = None,
) -> Image.Image:
    """Run ``model`` (a MaskedAutoencoder, not DDP-wrapped) on up to ``max_images`` uint8 images [N,3,H,W], under
    autocast ``dtype`` (the run's resolved ``train.amp``; None: fp32).

    The mask comes from ``seed``, so pictures at different steps show the same masks. With norm-pix loss the
    prediction is per-patch normalised; it is mapped back with the target patches' own mean and variance.
    """
    was_training = model.training
    model.eval()
    try:
        images = images[:max_images]
        device = next(model.parameters()).device
        imgs = normalize(images.to(device))
        n, num_patches = imgs.shape[0], model.num_patches
        noise = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(seed)).to(device)
        with autocast(dtype, device):
            _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        pred = pred.float()
        if getattr(model, "norm_pix_loss", False):
            target = model.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        p = model.patch_size
        # mask [N,L] → pixel mask [N,1,H,W], 1 = removed
        pix_mask = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * 3))[:, :1]
        recon = model.unpatchify(pred)
        masked = imgs * (1 - pix_mask)  # removed patches → 0 (the dataset mean, grey)
        pasted = imgs * (1 - pix_mask) + recon * pix_mask
        panels = [_to_uint8(t) for t in (imgs, masked, recon, pasted)]
    finally:
        model.train(was_training)
    rows = [np.concatenate([pnl[i] for pnl in panels], axis=1) for i in range(n)]
    sep = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    grid = rows[0]
    for r in rows[1:]:
        grid = np.concatenate([grid, sep, r], axis=0)
    return Image.fromarray(grid)
