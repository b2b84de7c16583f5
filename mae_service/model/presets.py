"""Model presets: names, encoder shapes and the overrides :func:`mae_service.model.create_model` accepts.

Torch-free, so configuration checks (``mae_service.config``) can use it without importing torch.
"""

from __future__ import annotations

from typing import Any

# Encoder presets (the ViT family); the decoder defaults are the paper's (512-d, 8 blocks, 16 heads).
PRESETS: dict[str, dict[str, Any]] = {
    # Not a paper size: a 4-block, 128-wide ViT that learns in minutes on a laptop CPU (the demo's encoder).
    "mae_vit_mini_patch16": dict(patch_size=16, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0),
    "mae_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "mae_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
}
# timm's name for the matching encoder architecture.
TIMM_NAMES = {
    "mae_vit_mini_patch16": "vit_tiny_patch16_224",  # with embed_dim/depth/num_heads given explicitly
    "mae_vit_tiny_patch16": "vit_tiny_patch16_224",
    "mae_vit_small_patch16": "vit_small_patch16_224",
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
}
MODEL_NAMES: tuple[str, ...] = tuple(PRESETS)

# Constructor defaults shared by every preset (the decoder is the paper's).
DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    in_chans=3,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    norm_pix_loss=False,
    mask_ratio=0.75,
)
OVERRIDE_KEYS: tuple[str, ...] = tuple(sorted({*PRESETS["mae_vit_base_patch16"], *DEFAULTS}))


def preset(name: str) -> dict[str, Any]:
    """The encoder preset of ``name``: ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model name {name!r}: allowed {', '.join(MODEL_NAMES)}")
    return dict(PRESETS[name])
