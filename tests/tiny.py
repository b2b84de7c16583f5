"""The tiny MAE the tests train (a 32 px ViT-tiny with 8 px patches and a 1-block, 32-wide decoder), as config
overrides: each test adds the workers, batch and data settings it needs."""

TINY_MODEL = [
    "model.name=mae_vit_tiny_patch16",
    "data.image_size=32",
    "model.patch_size=8",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=1",
    "model.decoder_num_heads=4",
]
# One worker, batch 8: what the in-process (no Ray) tests build.
TINY_LOCAL = [*TINY_MODEL, "train.batch_size=8", "train.num_workers=1"]
