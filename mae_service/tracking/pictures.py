"""``mae-service reconstruct``: the registered MAE (decoder included) on a few images of a dataset, as one PNG.

The picture itself is :func:`mae_service.model.pictures.reconstruction_grid`; this module loads the model from
the registry and the images with Ray Data.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def reconstruct_to_file(
    model_uri: str,
    data_uri: str,
    out: str,
    *,
    fmt: str = "files",
    num_images: int = 4,
    mask_ratio: float | None = None,
    seed: int = 0,
    s3_endpoint: str | None = None,
    tracking_uri: str | None = None,
    amp: str = "auto",
) -> Path:
    """Write ``out`` (PNG): per image, original | masked | reconstruction | reconstruction + visible patches.

    Images: the first ``num_images`` of ``data_uri`` in listing order, centre-cropped to the model's size. The
    model runs on the CPU under the autocast ``amp`` (a ``train.amp`` mode) resolves to there.
    """
    import numpy as np
    import torch

    from mae_service.data import eval_dataset, open_source
    from mae_service.model.pictures import reconstruction_grid
    from mae_service.model.precision import resolve_amp
    from mae_service.runtime import init_ray
    from mae_service.tracking.registry import load_mae

    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out!r}: must be a .png file")
    if not path.parent.is_dir():
        raise ValueError(f"--out {out!r}: folder {str(path.parent)!r} does not exist; give a .png in a writable folder")
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a folder; give a .png file path")
    try:  # writable? (checked here, not after the model ran; an existing file is replaced only at the end)
        with tempfile.TemporaryFile(dir=path.parent, prefix=".mae-write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"--out {out!r}: cannot write in {str(path.parent)!r} ({e.strerror or e}); give a .png in a writable folder"
        ) from None
    if mask_ratio is not None and not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio {mask_ratio}: must be in (0, 1)")
    dtype = resolve_amp(amp, "cpu")
    model = load_mae(model_uri, tracking_uri=tracking_uri)
    src = open_source(data_uri, fmt, s3_endpoint=s3_endpoint)
    if src.num_images == 0:
        raise ValueError(f"{data_uri} has no images")
    init_ray()
    batch = eval_dataset(src, image_size=model.img_size).limit(num_images).take_batch(num_images, batch_format="numpy")
    images = torch.from_numpy(np.array(batch["image"]))  # a writable copy of the read-only Ray array
    grid = reconstruction_grid(model, images, mask_ratio=mask_ratio, seed=seed, max_images=num_images, dtype=dtype)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        partial = Path(f.name)
    try:  # a whole picture or the old file: never a half-written one
        grid.save(partial, format="PNG")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (%d images from %s)", path, images.shape[0], data_uri)
    return path


def latest_picture(tracking_uri: str, run_id: str) -> str | None:
    """Where run ``run_id``'s latest reconstruction picture is stored (a local path for a local artifact store,
    else its URI); None when it has none or the store cannot be asked."""
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri)
        pictures = sorted(f.path for f in client.list_artifacts(run_id, "reconstructions") if f.path.endswith(".png"))
        if not pictures:
            return None
        root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    except Exception as e:  # noqa: BLE001 - the summary line is a nicety
        logger.debug("no reconstruction picture found: %s", e)
        return None
    uri = f"{root}/{pictures[-1]}"
    return uri.removeprefix("file://") if uri.startswith("file://") else uri
