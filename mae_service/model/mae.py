"""Masked Autoencoder (He et al., 2021) on timm's ViT parts.

Read next to the paper: ``patchify`` → ``random_masking`` → ``forward_encoder`` (visible patches only) →
``forward_decoder`` (mask tokens + position embeddings, all patches) → ``forward_loss`` (removed patches only).
Shapes: ``N`` images, ``L`` patches per image, ``p`` patch side, ``D`` encoder width, ``Dd`` decoder width.

Parameter names equal those of the released MAE checkpoints, so their files load strictly, and the encoder part
is a timm ``VisionTransformer`` state dict (see :meth:`MaskedAutoencoder.encoder_state_dict_timm`).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mae_service.model.attention import Attention
from mae_service.model.pos_embed import sincos_2d
from mae_service.model.presets import DEFAULTS as _DEFAULTS
from mae_service.model.presets import OVERRIDE_KEYS, preset
from mae_service.model.presets import TIMM_NAMES as _TIMM_NAMES

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize(imgs: Tensor) -> Tensor:
    """``uint8 [N, 3, H, W]`` → float32 ImageNet-normalised ``[N, 3, H, W]`` on the same device."""
    if not isinstance(imgs, Tensor) or imgs.dtype != torch.uint8:
        got = imgs.dtype if isinstance(imgs, Tensor) else type(imgs).__name__
        raise ValueError(f"normalize expects a uint8 tensor [N, 3, H, W], got dtype {got}")
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"normalize expects shape [N, 3, H, W], got {list(imgs.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=imgs.device).view(1, 3, 1, 1)
    return (imgs.to(torch.float32) / 255.0 - mean) / std


def _check_mask_ratio(mask_ratio: float, allow_zero: bool = False) -> float:
    ok = (0.0 <= mask_ratio < 1.0) if allow_zero else (0.0 < mask_ratio < 1.0)
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, int | float) or not ok:
        allowed = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"mask_ratio={mask_ratio!r}: must be a number in {allowed}")
    return float(mask_ratio)


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder and a lightweight ViT decoder. Build it with :func:`create_model`."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        model_args: dict[str, Any] | None = None,
    ):
        """The whole architecture in one place, encoder then decoder, as the paper's Figure 1 reads; long only
        because it is a list of plain assignments, kept together on purpose."""
        super().__init__()
        _validate_arch(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = float(mlp_ratio)
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads
        self.norm_pix_loss = bool(norm_pix_loss)
        self.mask_ratio = _check_mask_ratio(mask_ratio)
        self.model_args = dict(model_args or {})
        norm_layer: Any = partial(nn.LayerNorm, eps=1e-6)

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=Attention)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    decoder_embed_dim,
                    decoder_num_heads,
                    mlp_ratio,
                    qkv_bias=True,
                    norm_layer=norm_layer,
                    attn_layer=Attention,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # ---- initialisation (the reference's) ---------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Fixed sin-cos position embeddings; xavier-uniform Linear (and patch projection as a Linear);
        tokens ~ N(0, 0.02²); LayerNorm weight 1, bias 0."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size, cls_token=True)[None])
            self.decoder_pos_embed.copy_(sincos_2d(self.decoder_embed_dim, self.grid_size, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_module)

    # ---- input checks -----------------------------------------------------------------------------------------
    def check_images(self, imgs: Tensor) -> None:
        """ValueError unless ``imgs`` is a floating tensor ``[N, in_chans, img_size, img_size]``."""
        if not isinstance(imgs, Tensor) or not imgs.is_floating_point():
            got = imgs.dtype if isinstance(imgs, Tensor) else type(imgs).__name__
            raise ValueError(
                f"images must be a normalised floating tensor [N, {self.in_chans}, {self.img_size}, {self.img_size}], "
                f"got dtype {got} (uint8 batches go through mae_service.model.normalize first)"
            )
        want = (self.in_chans, self.img_size, self.img_size)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != want:
            raise ValueError(f"images must have shape [N, {', '.join(map(str, want))}], got {list(imgs.shape)}")

    def _check_noise(self, noise: Tensor | None, n: int) -> None:
        if noise is not None and tuple(noise.shape) != (n, self.num_patches):
            raise ValueError(f"noise must have shape [N, L] = [{n}, {self.num_patches}], got {list(noise.shape)}")

    # ---- patches ----------------------------------------------------------------------------------------------
    def patchify(self, imgs: Tensor) -> Tensor:
        """``[N, C, H, W]`` → ``[N, L, p*p*C]``; patches row-major, pixels within a patch ``(row, col, channel)``."""
        p, g, c = self.patch_size, self.grid_size, self.in_chans
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], g * g, p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``[N, L, p*p*C]`` → ``[N, C, H, W]`` (inverse of :meth:`patchify`)."""
        p, g, c = self.patch_size, self.grid_size, self.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    # ---- masking ----------------------------------------------------------------------------------------------
    def random_masking(
        self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random masking by argsort of uniform noise (small noise = kept).

        x ``[N, L, D]`` → x_masked ``[N, int(L*(1-r)), D]``, mask ``[N, L]`` (0 kept, 1 removed),
        ids_restore ``[N, L]`` (``gather(shuffled, ids_restore)`` is the original order).
        """
        mask_ratio = _check_mask_ratio(mask_ratio, allow_zero=True)
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device, dtype=torch.float32)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    # ---- encoder ----------------------------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs ``[N, C, H, W]`` → latent ``[N, 1+len_keep, D]`` (cls first, final norm applied), mask, ids_restore.

        ``mask_ratio`` may be 0 here (all patches kept, in the noise's order).
        """
        self.check_images(imgs)
        self._check_noise(noise, imgs.shape[0])
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: Tensor) -> Tensor:
        """Encoder on all patches, no masking: ``[N, 1+L, D]`` with the final norm applied.

        Equals ``forward_features`` of the timm model built from :meth:`timm_architecture` and
        :meth:`encoder_state_dict_timm`.
        """
        self.check_images(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # ---- decoder ----------------------------------------------------------------------------------------------
    def _decode_tokens(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent ``[N, 1+len_keep, D]`` → decoder tokens ``[N, 1+L, Dd]`` after the last block (before norm)."""
        x = self.decoder_embed(latent)  # [N, 1+len_keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # original order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return x

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent ``[N, 1+len_keep, D]``, ids_restore ``[N, L]`` → pred ``[N, L, p*p*C]`` for every patch."""
        x = self._decode_tokens(latent, ids_restore)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    # ---- loss -------------------------------------------------------------------------------------------------
    def _target(self, patches: Tensor) -> Tensor:
        if self.norm_pix_loss:  # per-patch normalised pixels; unbiased variance, as the reference
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            patches = (patches - mean) / (var + 1.0e-6) ** 0.5
        return patches

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """imgs ``[N, C, H, W]``, pred ``[N, L, p*p*C]``, mask ``[N, L]`` → mean squared error on removed patches."""
        target = self._target(self.patchify(imgs))
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L] per-patch loss
        return (loss * mask).sum() / mask.sum()

    def _removed_loss(self, imgs: Tensor, tokens: Tensor, ids_restore: Tensor, len_keep: int) -> Tensor:
        """The same loss, computing the prediction head only on the removed patches (the ones the loss reads)."""
        ids_removed = torch.argsort(ids_restore, dim=1)[:, len_keep:]  # [N, L-len_keep] = ids_shuffle[:, keep:]
        x = torch.gather(tokens[:, 1:, :], 1, ids_removed.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
        pred = self.decoder_pred(self.decoder_norm(x))  # [N, L-len_keep, p*p*C]
        patches = self.patchify(imgs)
        target = torch.gather(patches, 1, ids_removed.unsqueeze(-1).expand(-1, -1, patches.shape[2]))
        return ((pred - self._target(target)) ** 2).mean()

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None, *, return_pred: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """imgs normalised ``[N, C, H, W]`` → (loss, pred ``[N, L, p*p*C]``, mask ``[N, L]`` with 1 = removed).

        ``mask_ratio`` defaults to the model's; ``noise`` ``[N, L]`` fixes the mask (argsort, small = kept).
        ``return_pred=False`` is the training path: the same loss, pred returned as None, and the prediction head
        is computed only for removed patches (the visible patches' predictions are never used by the loss).
        """
        mask_ratio = self.mask_ratio if mask_ratio is None else _check_mask_ratio(mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if return_pred:
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        tokens = self._decode_tokens(latent, ids_restore)
        return self._removed_loss(imgs, tokens, ids_restore, latent.shape[1] - 1), None, mask

    # ---- interoperability -------------------------------------------------------------------------------------
    def timm_architecture(self) -> tuple[str, dict[str, Any]]:
        """``(name, kwargs)`` such that ``timm.create_model(name, pretrained=False, **kwargs)`` is this encoder
        (classifier removed: ``num_classes=0``); load :meth:`encoder_state_dict_timm` into it strictly."""
        name = self.model_args.get("name", "mae_vit_base_patch16")
        kwargs = dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            # The pooled embedding is the mean of the final-normed patch tokens: MAE pretrains no objective
            # on the class token (the paper's fine-tuning recipe pools the patch tokens), and on the k-NN
            # metric the class token of a short run is no better than random weights. fc_norm=False keeps
            # the weights' layout (final ``norm.*``, no ``fc_norm.*``), so the same state dict loads strictly.
            global_pool="avg",
            fc_norm=False,
        )
        return _TIMM_NAMES.get(name, "vit_base_patch16_224"), kwargs

    def encoder_state_dict_timm(self) -> dict[str, Tensor]:
        """The encoder's weights under timm ``VisionTransformer`` names (detached copies)."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, mask_ratio={self.mask_ratio}, "
            f"norm_pix_loss={self.norm_pix_loss}"
        )


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _validate_arch(
    img_size,
    patch_size,
    in_chans,
    embed_dim,
    depth,
    num_heads,
    mlp_ratio,
    decoder_embed_dim,
    decoder_depth,
    decoder_num_heads,
) -> None:
    problems = []
    for key, val in dict(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
    ).items():
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            problems.append(f"{key}={val!r}: must be a positive integer")
    if problems:
        raise ValueError("; ".join(problems))
    if img_size % patch_size:
        raise ValueError(
            f"img_size={img_size} is not divisible by patch_size={patch_size}: "
            f"allowed image sizes are multiples of {patch_size}"
        )
    if embed_dim % num_heads or embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be a multiple of 4 and of num_heads={num_heads}")
    if decoder_embed_dim % decoder_num_heads or decoder_embed_dim % 4:
        raise ValueError(
            f"decoder_embed_dim={decoder_embed_dim} must be a multiple of 4 and of "
            f"decoder_num_heads={decoder_num_heads}"
        )
    if not isinstance(mlp_ratio, int | float) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio={mlp_ratio!r}: must be a positive number")


def create_model(name: str, **overrides: Any) -> MaskedAutoencoder:
    """Build the MAE preset ``name`` (see ``MODEL_NAMES``) with optional ``overrides`` (see ``OVERRIDE_KEYS``).

    ``model.model_args == {"name": name, **overrides}``, so ``create_model(**model.model_args)`` rebuilds it.
    """
    cfg = preset(name)
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown model override(s) {', '.join(unknown)}: allowed {', '.join(OVERRIDE_KEYS)}")
    # None means "keep the preset" (e.g. config's model.patch_size=None)
    given = {k: v for k, v in overrides.items() if v is not None}
    args = {**_DEFAULTS, **cfg, **given}
    model_args = {"name": name, **given}
    return MaskedAutoencoder(**args, model_args=model_args)
