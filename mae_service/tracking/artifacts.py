"""What a registered encoder version holds: file names, tag names, the format, checksums; writing and verifying.

A registered encoder is one MLflow model version whose model (an MLflow *logged model* linked to the training
run) holds, under ``artifacts/``:

- ``encoder.safetensors``: the encoder weights in timm ``VisionTransformer`` layout;
- ``architecture.json``: the timm architecture and its arguments, the normalisation, the MAE's ``create_model``
  arguments and the weights' sha256;
- ``mae.safetensors``: the full MAE (decoder included), for ``mae-service reconstruct``;

plus the pyfunc (``encoder_pyfunc.py``, models from code) that serves embeddings, ``MLmodel`` and MLflow's
environment files. The version's ``files_sha256`` tag maps every file of the model directory to its sha256
(:data:`FILES_SHA_TAG`): tags live in the tracking store, not beside the files, so a file changed, removed or
added in the artifact store is caught (:func:`check_tree`). Versions registered before that tag existed carry
only the weights' and architecture's checksums (``weights_sha256`` …), which loads still check. Shared by :mod:`.registry` (reads) and
:mod:`.register` (writes); imports nothing from MLflow, torch/safetensors only inside :func:`stage_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mae_service.model import MaskedAutoencoder

# ---- names stored in the registry ---------------------------------------------------------------------------
KIND_TAG = "mae_service.kind"
KIND = "encoder"
WEIGHTS_SHA_TAG = "weights_sha256"
MAE_SHA_TAG = "mae_weights_sha256"
ARCH_SHA_TAG = "architecture_sha256"
EVAL_TAG_PREFIX = "eval."
FILES_SHA_TAG = "files_sha256"
"""JSON ``{relative path: sha256}`` of every file of the version's model directory, recorded at registration."""

FORMAT = "mae-service-encoder/1"  # also in encoder_pyfunc.py, which must stay free of package imports
ENCODER_FILE = "encoder.safetensors"
MAE_FILE = "mae.safetensors"
ARCH_FILE = "architecture.json"
ARTIFACT_SUBDIR = "artifacts"  # where pyfunc puts its artifacts inside the model directory
PYFUNC_FILE = Path(__file__).with_name("encoder_pyfunc.py")
SHA_TAG_OF = {ENCODER_FILE: WEIGHTS_SHA_TAG, MAE_FILE: MAE_SHA_TAG, ARCH_FILE: ARCH_SHA_TAG}
"""The version tag that records each file's sha256."""


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# ---- writing -------------------------------------------------------------------------------------------------
def _architecture(model: MaskedAutoencoder, out: Path) -> dict[str, Any]:
    from mae_service.model import IMAGENET_MEAN, IMAGENET_STD

    timm_name, timm_kwargs = model.timm_architecture()
    return {
        "format": FORMAT,
        "timm_name": timm_name,
        "timm_kwargs": timm_kwargs,
        "image_size": int(model.img_size),
        "embed_dim": int(model.embed_dim),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "uint8 [N, 3, H, W] RGB; resized to image_size x image_size when different",
        "output": f"float32 [N, {int(model.embed_dim)}] (timm pooled output, global_pool="
        f"{timm_kwargs.get('global_pool', 'token')})",
        "weights_sha256": sha256_file(out / ENCODER_FILE),
        "mae_weights_sha256": sha256_file(out / MAE_FILE),
        "mae_model_args": dict(model.model_args),
    }


def stage_files(model: MaskedAutoencoder, out: Path) -> dict[str, str]:
    """Write encoder/MAE safetensors and architecture.json into ``out``; return their sha256 by tag name."""
    from safetensors.torch import save_file

    enc_state = {k: v.detach().cpu().contiguous() for k, v in model.encoder_state_dict_timm().items()}
    mae_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata entry each: safetensors writes its metadata map in an arbitrary order, so with two entries the
    # same weights could give two different files (and checksums) from one save to the next.
    save_file(enc_state, str(out / ENCODER_FILE), metadata={"format": f"{FORMAT} timm"})
    save_file(mae_state, str(out / MAE_FILE), metadata={"format": f"{FORMAT} mae"})
    arch = _architecture(model, out)
    (out / ARCH_FILE).write_text(json.dumps(arch, indent=2, sort_keys=True) + "\n")
    return {
        WEIGHTS_SHA_TAG: arch["weights_sha256"],
        MAE_SHA_TAG: arch["mae_weights_sha256"],
        ARCH_SHA_TAG: sha256_file(out / ARCH_FILE),
    }


def hash_tree(root: Path) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every file below ``root``."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ---- verifying -----------------------------------------------------------------------------------------------
def verify(path: Path, expected: str | None, model_uri: str, what: str) -> None:
    """ValueError unless ``path`` exists and has the sha256 ``expected`` (recorded at registration)."""
    if not expected:
        raise ValueError(f"{model_uri}: no sha256 recorded for {what}; it cannot be verified")
    if not path.is_file():
        raise ValueError(f"{model_uri}: {what} is missing from the registered model")
    got = sha256_file(path)
    if got != expected:
        raise ValueError(
            f"{model_uri}: {what} has sha256 {got[:16]}… but {expected[:16]}… was recorded at "
            "registration; the artifact is truncated or was modified — refusing to load it"
        )


def load_arch(path: Path, model_uri: str) -> dict[str, Any]:
    """The parsed ``architecture.json``; ValueError when it is not :data:`FORMAT`."""
    arch = json.loads(path.read_text())
    if arch.get("format") != FORMAT:
        raise ValueError(f"{model_uri}: {ARCH_FILE} has format {arch.get('format')!r}, expected {FORMAT!r}")
    return arch


def files_manifest(tags: dict[str, str], model_uri: str) -> dict[str, str] | None:
    """The version's recorded ``{path: sha256}`` (None for versions registered before it was recorded)."""
    raw = tags.get(FILES_SHA_TAG)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()) or not manifest:
        raise ValueError(f"{model_uri}: the {FILES_SHA_TAG} tag is not a mapping of files to sha256; refusing to load")
    return manifest


def check_tree(root: Path, manifest: dict[str, str], model_uri: str, only: set[str] | None = None) -> None:
    """ValueError unless the files below ``root`` are exactly ``manifest``'s (or its ``only`` subset) with the
    recorded sha256: a changed, missing or (when checking everything) extra file is refused, named."""
    want = {k: v for k, v in manifest.items() if only is None or k in only}
    got = hash_tree(root)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want)) if only is None else []
    changed = sorted(k for k in set(want) & set(got) if got[k] != want[k])
    if not (missing or extra or changed):
        return
    parts = []
    if changed:
        k = changed[0]
        parts.append(
            f"{', '.join(changed)} changed (sha256 {got[k][:16]}… but {want[k][:16]}… was recorded at registration)"
        )
    if missing:
        parts.append(f"{', '.join(missing)} missing")
    if extra:
        parts.append(f"{', '.join(extra)} not part of the registered version")
    raise ValueError(
        f"{model_uri}: {'; '.join(parts)}; the artifact is truncated or was modified — refusing to load it"
    )
