"""MLflow pyfunc of a registered mae-service encoder: uint8 images ``[N, 3, H, W]`` → embeddings ``[N, D]``.

Logged as *models from code*: MLflow stores this file with the model and runs it at load time, so nothing is
unpickled and the serving environment needs only ``mlflow``, ``numpy``, ``torch``, ``timm`` and ``safetensors``
— not ``mae_service``. Keep it self-contained: import nothing from the package.

The embedding equals :func:`mae_service.evaluation.embed`: pixels / 255, resize to the encoder's image size if
needed (bilinear, antialiased), ImageNet normalisation, then the timm ViT's pooled output (``num_classes=0``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

FORMAT = "mae-service-encoder/1"
CHUNK = 64  # images per forward pass, bounds memory for large requests


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class EncoderModel(PythonModel):
    """Loads ``artifacts/architecture.json`` + ``artifacts/encoder.safetensors`` into a timm ViT."""

    def load_context(self, context) -> None:
        import timm
        import torch
        from safetensors.torch import load_file

        arch = json.loads(Path(context.artifacts["architecture"]).read_text())
        if arch.get("format") != FORMAT:
            raise ValueError(f"architecture.json has format {arch.get('format')!r}, expected {FORMAT!r}")
        weights = context.artifacts["weights"]
        digest = sha256_file(weights)
        if digest != arch["weights_sha256"]:
            raise ValueError(
                f"encoder weights {weights} have sha256 {digest}, architecture.json records "
                f"{arch['weights_sha256']}: the artifact is corrupt or was modified"
            )
        encoder: Any = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
        encoder.load_state_dict(load_file(weights), strict=True)
        self.encoder = encoder.eval()
        self.size = int(arch["image_size"])
        self.mean = torch.tensor(arch["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(arch["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = np.asarray(model_input)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {list(x.shape)}")
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], CHUNK):
                t = torch.from_numpy(np.ascontiguousarray(x[start : start + CHUNK])).to(torch.float32) / 255.0
                t = (t - self.mean) / self.std
                if t.shape[-2:] != (self.size, self.size):
                    t = torch.nn.functional.interpolate(
                        t, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
                    )
                out.append(self.encoder(t).float().numpy())
        if not out:
            return np.zeros((0, self.encoder.num_features), dtype=np.float32)
        return np.concatenate(out)


mlflow.models.set_model(EncoderModel())
