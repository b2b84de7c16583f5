"""Looking up and loading registered encoders: ``models:/`` URIs, resolution, verified loads, listings.

``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (parsed by :mod:`.uris`) → :func:`resolve` (which version, or one line saying what
exists instead) → :func:`load_encoder` / :func:`load_mae` / :func:`download` (every file checked against the
sha256 recorded at registration, in a temporary folder, before it is read or lands in OUT; see :mod:`.artifacts`), and :func:`list_versions` / :func:`describe` for
``mae-service models``. Aliases, not stages, name the versions people use. Writing versions is
:mod:`.register`'s job. MLflow, torch and timm load inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae_service.tracking.artifacts import (
    ARCH_FILE,
    ARTIFACT_SUBDIR,
    ENCODER_FILE,
    FILES_SHA_TAG,
    KIND,
    KIND_TAG,
    MAE_FILE,
    PYFUNC_FILE,
    SHA_TAG_OF,
    WEIGHTS_SHA_TAG,
    check_tree,
    files_manifest,
    load_arch,
    verify,
)
from mae_service.tracking.runs import connect
from mae_service.tracking.uris import (  # noqa: F401 - check_alias: registry.check_alias stays importable
    ModelRef,
    check_alias,
    error_code,
    first_line,
    parse_model_uri,
    with_tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

    from mae_service.model import MaskedAutoencoder

logger = logging.getLogger(__name__)


# ---- resolution ---------------------------------------------------------------------------------------------
def _registered_names(client: MlflowClient, limit: int = 20) -> str:
    names = [m.name for m in client.search_registered_models(max_results=limit)]
    return ", ".join(sorted(names)) + (", …" if len(names) >= limit else "") if names else "(none)"


def _versions_of(client: MlflowClient, name: str) -> list[ModelVersion]:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _version_number(ref: ModelRef, aliases: dict[str, Any], versions: list[ModelVersion], model_uri: str) -> str:
    """The version ``ref`` names, given the model's aliases and versions; ValueError saying what exists."""
    listed = ", ".join(str(v.version) for v in versions) or "(none)"
    if ref.alias is not None:
        if ref.alias not in aliases:
            have = ", ".join(f"@{a} → {v}" for a, v in sorted(aliases.items())) or "(none)"
            raise ValueError(
                f"model {ref.name!r} has no alias {ref.alias!r} (asked for {model_uri}); "
                f"aliases: {have}; versions: {listed}"
            )
        return str(aliases[ref.alias])
    if ref.version == "latest":
        if not versions:
            raise ValueError(f"model {ref.name!r} has no versions (asked for {model_uri})")
        return str(versions[-1].version)
    if str(ref.version) not in {str(v.version) for v in versions}:
        raise ValueError(f"model {ref.name!r} has no version {ref.version} (asked for {model_uri}); versions: {listed}")
    return str(ref.version)


def resolve(model_uri: str, tracking_uri: str | None = None) -> tuple[MlflowClient, str, ModelVersion]:
    """``(client, tracking URI, version)`` for ``model_uri``; ValueError naming what was asked and what exists.

    An alias is read once, here: callers that act on the version more than once use the pinned
    ``models:/NAME/VERSION`` afterwards (:func:`pinned_uri`), so a moving alias cannot split their work."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(model_uri)
    client, uri = connect(tracking_uri)
    try:
        try:
            rm = client.get_registered_model(ref.name)
        except MlflowException as e:
            if error_code(e) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(
                f"no registered model {ref.name!r} at {uri} (asked for {model_uri}); "
                f"registered models: {_registered_names(client)}"
            ) from None
        version = _version_number(ref, dict(rm.aliases or {}), _versions_of(client, ref.name), model_uri)
        return client, uri, client.get_model_version(ref.name, version)
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed looking up {model_uri}: {first_line(e)}") from None


def pinned_uri(mv: ModelVersion) -> str:
    """``models:/NAME/VERSION`` of a resolved version."""
    return f"models:/{mv.name}/{mv.version}"


def check_encoder(client: MlflowClient, mv: ModelVersion, model_uri: str) -> None:
    """ValueError (listing the encoders there are) unless ``mv`` was registered by mae-service."""
    if mv.tags.get(KIND_TAG) == KIND and mv.tags.get(WEIGHTS_SHA_TAG):
        return
    encoders = sorted({v.name for v in client.search_model_versions(f"tags.`{KIND_TAG}` = '{KIND}'")})
    raise ValueError(
        f"{model_uri} (model {mv.name!r} version {mv.version}) is not an mae-service encoder "
        f"(no {KIND_TAG}={KIND} tag); registered mae-service encoders: {', '.join(encoders) or '(none)'}"
    )


# ---- loading ------------------------------------------------------------------------------------------------
def _download(client: MlflowClient, uri: str, mv: ModelVersion, relpath: str, dst: str, model_uri: str) -> Path:
    import mlflow

    base = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{relpath}", dst_path=dst, tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - any storage failure: one line naming the file
        raise ValueError(f"{model_uri}: cannot download {relpath} ({first_line(e)})") from None
    return Path(local)


def _legacy_warning(model_uri: str, mv: ModelVersion) -> None:
    logger.warning(
        "%s (version %s of %s) was registered before every file got a checksum (no %s tag): only %s, %s and %s "
        "are verified; register it again to cover its other files (MLmodel, %s …)",
        model_uri,
        mv.version,
        mv.name,
        FILES_SHA_TAG,
        ARCH_FILE,
        ENCODER_FILE,
        MAE_FILE,
        PYFUNC_FILE.name,
    )


def _fetch_verified(model_uri: str, tracking_uri: str | None, weights: str, dst: str) -> tuple[dict[str, Any], Path]:
    """Download ``weights`` (ENCODER_FILE or MAE_FILE), ``architecture.json`` and the version's other files except
    the weights this load does not read into ``dst``; verify them all against the checksums recorded at
    registration before anything is read."""
    client, uri, mv = resolve(model_uri, tracking_uri)
    check_encoder(client, mv, model_uri)
    manifest = files_manifest(mv.tags, model_uri)
    root = Path(dst) / "model"
    arch_rel, w_rel = f"{ARTIFACT_SUBDIR}/{ARCH_FILE}", f"{ARTIFACT_SUBDIR}/{weights}"
    if manifest is None:
        _legacy_warning(model_uri, mv)
        arch_path = _download(client, uri, mv, arch_rel, dst, model_uri)
        verify(arch_path, mv.tags.get(SHA_TAG_OF[ARCH_FILE]), model_uri, ARCH_FILE)
        w_path = _download(client, uri, mv, w_rel, dst, model_uri)
        verify(w_path, mv.tags.get(SHA_TAG_OF[weights]), model_uri, weights)
        return load_arch(arch_path, model_uri), w_path
    unused = {f"{ARTIFACT_SUBDIR}/{name}" for name in (ENCODER_FILE, MAE_FILE)} - {w_rel}
    wanted = {rel for rel in manifest if rel not in unused} | {arch_rel, w_rel}
    for rel in sorted(wanted):
        if rel not in manifest:
            raise ValueError(f"{model_uri}: {rel} is not among the files recorded at registration; refusing to load it")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _download(client, uri, mv, rel, str((root / rel).parent), model_uri)
    check_tree(root, manifest, model_uri, only=wanted)
    return load_arch(root / arch_rel, model_uri), root / w_rel


@with_tracking_uri
def load_encoder(model_uri: str, *, tracking_uri: str | None = None) -> nn.Module:
    """The registered encoder ``model_uri`` as a timm ``VisionTransformer`` (``num_classes=0``, eval mode).

    ``model_uri``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; ``tracking_uri`` defaults to MLflow's
    (``MLFLOW_TRACKING_URI``). The weights are checked against the sha256 recorded at registration and loaded
    with safetensors (no pickle). Embeddings: ``encoder(normalised images)``, or
    :func:`mae_service.evaluation.embed` on uint8 images. ``encoder.mae_architecture`` holds the timm name and
    arguments it was built from.
    """
    import timm
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="mae-encoder-") as tmp:
        arch, w_path = _fetch_verified(model_uri, tracking_uri, ENCODER_FILE, tmp)
        encoder: Any = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
        encoder.load_state_dict(load_file(str(w_path)), strict=True)
    # what rebuilds it (e.g. in Ray Data actors) and where it came from
    encoder.mae_architecture = {
        "timm_name": arch["timm_name"],
        "timm_kwargs": dict(arch["timm_kwargs"]),
        "image_size": arch["image_size"],
        "weights_sha256": arch["weights_sha256"],
    }
    return encoder.eval()


@with_tracking_uri
def load_mae(model_uri: str, *, tracking_uri: str | None = None) -> MaskedAutoencoder:
    """The full :class:`~mae_service.model.MaskedAutoencoder` (decoder included) registered as ``model_uri``."""
    from safetensors.torch import load_file

    from mae_service.model import create_model

    with tempfile.TemporaryDirectory(prefix="mae-model-") as tmp:
        arch, w_path = _fetch_verified(model_uri, tracking_uri, MAE_FILE, tmp)
        model = create_model(**arch["mae_model_args"])
        model.load_state_dict(load_file(str(w_path)), strict=True)
    return model.eval()


def _free_target(out: Path) -> Path:
    """The existing folder the download is staged in (``out``'s nearest existing ancestor), after checking that
    ``out`` is new or an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {str(out)!r} is not empty; give a new or empty folder")
    anchor = out.absolute().parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {str(out)!r}: cannot write in {str(anchor)!r}; give a writable folder")
    return anchor


@with_tracking_uri
def download(model_uri: str, out_dir: str | os.PathLike, *, tracking_uri: str | None = None) -> Path:
    """Copy the whole registered model directory (MLmodel, pyfunc, weights) into ``out_dir``, which must be new or
    empty; also writes ``out_dir/registry.json`` (name, version, aliases, tags). Returns ``out_dir``.

    Everything is downloaded into a temporary folder beside ``out_dir`` and checked there against the sha256 of
    every file recorded at registration (a changed, missing or added file is refused); only a verified model is
    moved into ``out_dir``. On refusal ``out_dir`` is as it was (not created if it did not exist)."""
    import mlflow

    client, uri, mv = resolve(model_uri, tracking_uri)
    check_encoder(client, mv, model_uri)
    manifest = files_manifest(mv.tags, model_uri)
    out = Path(out_dir)
    anchor = _free_target(out)
    base = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    logger.info("downloading %s (version %s of %s) to %s", model_uri, mv.version, mv.name, out)
    with tempfile.TemporaryDirectory(prefix=".mae-download-", dir=anchor) as tmp:
        try:
            staged = Path(mlflow.artifacts.download_artifacts(artifact_uri=base, dst_path=tmp, tracking_uri=uri))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{model_uri}: cannot download the model ({first_line(e)})") from None
        if manifest is None:
            _legacy_warning(model_uri, mv)
            for name in (ARCH_FILE, ENCODER_FILE, MAE_FILE):
                verify(staged / ARTIFACT_SUBDIR / name, mv.tags.get(SHA_TAG_OF[name]), model_uri, name)
        else:
            check_tree(staged, manifest, model_uri)
        (staged / "registry.json").write_text(json.dumps(_version_info(client, mv), indent=2, sort_keys=True) + "\n")
        if out.exists():
            for item in staged.iterdir():
                shutil.move(str(item), out / item.name)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staged), out)
    return out


# ---- listing ------------------------------------------------------------------------------------------------
def _version_info(client: MlflowClient, mv: ModelVersion) -> dict[str, Any]:
    aliases = mv.aliases or [
        a for a, v in (client.get_registered_model(mv.name).aliases or {}).items() if str(v) == str(mv.version)
    ]
    return {
        "name": mv.name,
        "version": int(mv.version),
        "uri": pinned_uri(mv),
        "aliases": sorted(aliases),
        "created": mv.creation_timestamp,
        "status": mv.status,
        "run_id": mv.run_id,
        "source": mv.source,
        "encoder": mv.tags.get(KIND_TAG) == KIND,
        "tags": dict(sorted(mv.tags.items())),
    }


@with_tracking_uri
def list_versions(
    *, tracking_uri: str | None = None, name: str | None = None, include_all: bool = False
) -> list[dict[str, Any]]:
    """Registered versions (newest first within each model, models by name): mae-service encoders only unless
    ``include_all``. Each item as :func:`describe` returns it."""
    from mlflow.exceptions import MlflowException

    client, uri = connect(tracking_uri)
    try:
        if name is not None:
            names = [name]
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                raise ValueError(
                    f"no registered model {name!r} at {uri}; registered models: {_registered_names(client)}"
                )
        else:
            names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        rows: list[dict[str, Any]] = []
        for n in names:
            aliases = client.get_registered_model(n).aliases or {}
            for mv in reversed(_versions_of(client, n)):
                if include_all or mv.tags.get(KIND_TAG) == KIND:
                    mv.aliases = [a for a, v in aliases.items() if str(v) == str(mv.version)]
                    rows.append(_version_info(client, mv))
        return rows
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed listing models: {first_line(e)}") from None


def _files(client: MlflowClient, uri: str, mv: ModelVersion) -> dict[str, int | None]:
    """Relative path → bytes of every file of the version's model."""
    from mlflow.artifacts import list_artifacts

    base = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    files: dict[str, int | None] = {}
    stack = [""]
    while stack:
        prefix = stack.pop()
        for f in list_artifacts(artifact_uri=f"{base}/{prefix}" if prefix else base, tracking_uri=uri):
            path = f"{prefix}/{Path(f.path).name}" if prefix else Path(f.path).name
            if f.is_dir:
                stack.append(path)
            else:
                files[path] = f.file_size
    return dict(sorted(files.items()))


@with_tracking_uri
def describe(model_uri: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Everything the registry knows about one version: name, version, uri, aliases, created, status, run_id,
    source, encoder (bool), tags (lineage, checksums, evaluations), files (relative path → bytes)."""
    client, uri, mv = resolve(model_uri, tracking_uri)
    info = _version_info(client, mv)
    try:
        info["files"] = _files(client, uri, mv)
    except Exception as e:  # noqa: BLE001 - the listing is a convenience; the metadata is what was asked
        logger.warning("cannot list the files of %s: %s", model_uri, first_line(e))
        info["files"] = {}
    return info
