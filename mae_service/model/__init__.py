"""The MAE model: factory, presets, input normalisation, and checkpoint interoperability (see ``export``).

Pure module: imports torch and timm, never Ray or MLflow.
"""

from mae_service.model.mae import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    OVERRIDE_KEYS,
    MaskedAutoencoder,
    create_model,
    normalize,
    preset,
)
from mae_service.model.pos_embed import sincos_2d

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "OVERRIDE_KEYS",
    "MaskedAutoencoder",
    "create_model",
    "normalize",
    "preset",
    "sincos_2d",
]
