"""The MLflow model registry side of mae-service: register encoders, find them, load them, record evaluations.

A registered encoder is one MLflow model version whose model (an MLflow *logged model* linked to the training
run) holds:

- ``artifacts/encoder.safetensors``: the encoder weights in timm ``VisionTransformer`` layout;
- ``artifacts/architecture.json``: the timm architecture and its arguments, the normalisation, the MAE's
  ``create_model`` arguments and the weights' sha256;
- ``artifacts/mae.safetensors``: the full MAE (decoder included), for ``mae-service reconstruct``;
- a pyfunc (``encoder_pyfunc.py``, models from code) that turns uint8 ``[N, 3, H, W]`` into embeddings, with its
  signature, an input example and explicit pip requirements, so ``mlflow models serve`` works without
  ``mae_service``.

The version's tags carry the lineage (data URI, config digest, mask ratio, decoder width/depth, steps, final loss,
checkpoint URI, source run) and the sha256 of every weight file; loads verify the files against those tags.
Aliases, not stages, name the versions people use (``models:/NAME@ALIAS``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")

# ---- names stored in the registry ---------------------------------------------------------------------------
KIND_TAG = "mae_service.kind"
KIND = "encoder"
WEIGHTS_SHA_TAG = "weights_sha256"
MAE_SHA_TAG = "mae_weights_sha256"
ARCH_SHA_TAG = "architecture_sha256"
EVAL_TAG_PREFIX = "eval."
LINEAGE_KEYS = ("data_uri", "config_digest", "mask_ratio", "decoder_embed_dim", "decoder_depth", "steps",
                "final_loss", "checkpoint_uri", "source_run", WEIGHTS_SHA_TAG)
"""Lineage tags of every registered version; the caller of :func:`register_encoder` passes ``data_uri``,
``config_digest``, ``steps`` and ``final_loss`` in ``tags``; the rest is derived here."""

FORMAT = "mae-service-encoder/1"  # also in encoder_pyfunc.py, which must stay free of package imports
ENCODER_FILE = "encoder.safetensors"
MAE_FILE = "mae.safetensors"
ARCH_FILE = "architecture.json"
_ARTIFACT_SUBDIR = "artifacts"  # where pyfunc puts its artifacts inside the model directory
_PYFUNC_FILE = Path(__file__).with_name("encoder_pyfunc.py")
_LOGGED_MODEL_NAME = "encoder"
DEFAULT_EVAL_EXPERIMENT = "mae-service-eval"

_URI_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_URI_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/@]+)$")
_ALIAS_OK = re.compile(r"^[\w\-]+$")
_ALIAS_RESERVED_VERSION = re.compile(r"^[vV]\d+$")
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_?key|api_?key|session", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "RAY_AUTH_TOKEN")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# ---- model URIs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (VERSION may be ``latest``)."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    """Parse a registry URI; ValueError naming the accepted forms otherwise."""
    forms = "models:/NAME@ALIAS or models:/NAME/VERSION (e.g. models:/mae-encoder@current, models:/mae-encoder/3)"
    text = str(uri).strip()
    if m := _URI_ALIAS.match(text):
        return ModelRef(m["name"], alias=m["alias"])
    if m := _URI_VERSION.match(text):
        version = m["version"]
        if not (version.isdigit() and int(version) > 0) and version != "latest":
            raise ValueError(f"model URI {uri!r}: version {version!r} must be a positive integer or 'latest'; "
                             f"expected {forms}")
        return ModelRef(m["name"], version=version)
    raise ValueError(f"model URI {uri!r} is not of the form {forms}")


def check_alias(alias: str) -> str:
    """ValueError unless ``alias`` is a name MLflow accepts as an alias."""
    if not isinstance(alias, str) or not _ALIAS_OK.match(alias) or len(alias) > 255:
        raise ValueError(f"alias {alias!r}: must be 1-255 letters, digits, '_' or '-'")
    if alias.lower() == "latest" or _ALIAS_RESERVED_VERSION.match(alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow ('latest' and v<number> are not allowed); "
                         "pick a name such as current, best or production")
    return alias


# ---- registry connection ------------------------------------------------------------------------------------
def _resolve_tracking_uri(tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def check_reachable(tracking_uri: str, *, must_exist: bool = True, timeout: float = 5.0) -> None:
    """Fail fast (ValueError) when the registry cannot answer: an HTTP server that does not respond, or (for
    lookups) a SQLite file that does not exist. Other schemes are left to MLflow."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (perhaps 401/404): reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"MLflow registry at {tracking_uri} is unreachable ({reason}); start it or pass "
                             "--tracking-uri / MLFLOW_TRACKING_URI of a running one") from None
    elif tracking_uri.startswith("sqlite:///") and must_exist:
        path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).is_file():
            raise ValueError(f"no MLflow registry at {tracking_uri}: {path} does not exist (give --tracking-uri "
                             "or MLFLOW_TRACKING_URI of the registry the model was registered in)")
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise ValueError(f"tracking URI {tracking_uri!r}: MLflow 3's registry needs a database or server URI "
                         "(sqlite:///mlflow.db, http://host:5000)")


def connect(tracking_uri: str | None = None, *, must_exist: bool = True) -> tuple[MlflowClient, str]:
    """``(client, resolved tracking URI)``; the registry URI is the tracking URI."""
    from mlflow import MlflowClient

    uri = _resolve_tracking_uri(tracking_uri)
    check_reachable(uri, must_exist=must_exist)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """Parts of MLflow (model logging, ``models:/`` sources) read the global tracking URI: set it for the block,
    then restore it."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    if previous == uri:
        yield
        return
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _with_tracking_uri(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with its ``tracking_uri`` keyword resolved and installed as MLflow's global tracking URI."""

    @functools.wraps(fn)
    def wrapper(*args: Any, tracking_uri: str | None = None, **kwargs: Any) -> T:
        uri = _resolve_tracking_uri(tracking_uri)
        with _use_tracking_uri(uri):
            return fn(*args, tracking_uri=uri, **kwargs)

    return wrapper


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", ""))


def _registered_names(client: MlflowClient, limit: int = 20) -> str:
    names = [m.name for m in client.search_registered_models(max_results=limit)]
    return ", ".join(sorted(names)) + (", …" if len(names) >= limit else "") if names else "(none)"


def _versions_of(client: MlflowClient, name: str) -> list[ModelVersion]:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def resolve(model_uri: str, tracking_uri: str | None = None) -> tuple[MlflowClient, str, ModelVersion]:
    """``(client, tracking URI, version)`` for ``model_uri``; ValueError naming what was asked and what exists."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(model_uri)
    client, uri = connect(tracking_uri)
    try:
        try:
            rm = client.get_registered_model(ref.name)
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ValueError(f"no registered model {ref.name!r} at {uri} (asked for {model_uri}); "
                             f"registered models: {_registered_names(client)}") from None
        versions = _versions_of(client, ref.name)
        listed = ", ".join(str(v.version) for v in versions) or "(none)"
        if ref.alias is not None:
            aliases = rm.aliases or {}
            if ref.alias not in aliases:
                have = ", ".join(f"@{a} → {v}" for a, v in sorted(aliases.items())) or "(none)"
                raise ValueError(f"model {ref.name!r} has no alias {ref.alias!r} (asked for {model_uri}); "
                                 f"aliases: {have}; versions: {listed}")
            version = str(aliases[ref.alias])
        elif ref.version == "latest":
            if not versions:
                raise ValueError(f"model {ref.name!r} has no versions (asked for {model_uri})")
            version = str(versions[-1].version)
        else:
            version = str(ref.version)
            if version not in {str(v.version) for v in versions}:
                raise ValueError(f"model {ref.name!r} has no version {version} (asked for {model_uri}); "
                                 f"versions: {listed}")
        return client, uri, client.get_model_version(ref.name, version)
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed looking up {model_uri}: {_first_line(e)}") from None


def _check_encoder(client: MlflowClient, mv: ModelVersion, model_uri: str) -> None:
    if mv.tags.get(KIND_TAG) == KIND and mv.tags.get(WEIGHTS_SHA_TAG):
        return
    encoders = sorted({v.name for v in client.search_model_versions(f"tags.`{KIND_TAG}` = '{KIND}'")})
    raise ValueError(f"{model_uri} (model {mv.name!r} version {mv.version}) is not an mae-service encoder "
                     f"(no {KIND_TAG}={KIND} tag); registered mae-service encoders: {', '.join(encoders) or '(none)'}")


# ---- artifacts ----------------------------------------------------------------------------------------------
def _download(client: MlflowClient, uri: str, mv: ModelVersion, relpath: str, dst: str, model_uri: str) -> Path:
    import mlflow

    base = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{relpath}", dst_path=dst, tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - any storage failure: one line naming the file
        raise ValueError(f"{model_uri}: cannot download {relpath} ({_first_line(e)})") from None
    return Path(local)


def _verify(path: Path, expected: str | None, model_uri: str, what: str) -> None:
    if not expected:
        raise ValueError(f"{model_uri}: no sha256 recorded for {what}; it cannot be verified")
    if not path.is_file():
        raise ValueError(f"{model_uri}: {what} is missing from the registered model")
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"{model_uri}: {what} has sha256 {got[:16]}… but {expected[:16]}… was recorded at "
                         "registration; the artifact is truncated or was modified — refusing to load it")


def _load_arch(path: Path, model_uri: str) -> dict[str, Any]:
    arch = json.loads(path.read_text())
    if arch.get("format") != FORMAT:
        raise ValueError(f"{model_uri}: {ARCH_FILE} has format {arch.get('format')!r}, expected {FORMAT!r}")
    return arch


def _fetch_verified(model_uri: str, tracking_uri: str | None, weights: str, dst: str) -> tuple[dict, Path]:
    """Download and verify ``architecture.json`` and ``weights`` (ENCODER_FILE or MAE_FILE) into ``dst``."""
    client, uri, mv = resolve(model_uri, tracking_uri)
    _check_encoder(client, mv, model_uri)
    arch_path = _download(client, uri, mv, f"{_ARTIFACT_SUBDIR}/{ARCH_FILE}", dst, model_uri)
    _verify(arch_path, mv.tags.get(ARCH_SHA_TAG), model_uri, ARCH_FILE)
    w_path = _download(client, uri, mv, f"{_ARTIFACT_SUBDIR}/{weights}", dst, model_uri)
    _verify(w_path, mv.tags.get(WEIGHTS_SHA_TAG if weights == ENCODER_FILE else MAE_SHA_TAG), model_uri, weights)
    return _load_arch(arch_path, model_uri), w_path


@_with_tracking_uri
def load_encoder(model_uri: str, *, tracking_uri: str | None = None) -> nn.Module:
    """The registered encoder ``model_uri`` as a timm ``VisionTransformer`` (``num_classes=0``, eval mode).

    ``model_uri``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; ``tracking_uri`` defaults to MLflow's
    (``MLFLOW_TRACKING_URI``). The weights are checked against the sha256 recorded at registration and loaded
    with safetensors (no pickle). Embeddings: ``encoder(normalised images)``, or
    :func:`mae_service.features.embed` on uint8 images. ``encoder.mae_architecture`` holds the timm name and
    arguments it was built from.
    """
    import timm
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="mae-encoder-") as tmp:
        arch, w_path = _fetch_verified(model_uri, tracking_uri, ENCODER_FILE, tmp)
        encoder = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
        encoder.load_state_dict(load_file(str(w_path)), strict=True)
    # what rebuilds it (e.g. in Ray Data actors) and where it came from
    encoder.mae_architecture = {"timm_name": arch["timm_name"], "timm_kwargs": dict(arch["timm_kwargs"]),
                                "image_size": arch["image_size"], "weights_sha256": arch["weights_sha256"]}
    return encoder.eval()


@_with_tracking_uri
def load_mae(model_uri: str, *, tracking_uri: str | None = None) -> nn.Module:
    """The full :class:`~mae_service.model.MaskedAutoencoder` (decoder included) registered as ``model_uri``."""
    from safetensors.torch import load_file

    from mae_service.model import create_model

    with tempfile.TemporaryDirectory(prefix="mae-model-") as tmp:
        arch, w_path = _fetch_verified(model_uri, tracking_uri, MAE_FILE, tmp)
        model = create_model(**arch["mae_model_args"])
        model.load_state_dict(load_file(str(w_path)), strict=True)
    return model.eval()


@_with_tracking_uri
def download(model_uri: str, out_dir: str | os.PathLike, *, tracking_uri: str | None = None) -> Path:
    """Copy the whole registered model directory (MLmodel, pyfunc, weights) into ``out_dir`` and verify every
    weight file; also writes ``out_dir/registry.json`` (name, version, aliases, tags). Returns ``out_dir``."""
    import mlflow

    client, uri, mv = resolve(model_uri, tracking_uri)
    _check_encoder(client, mv, model_uri)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {str(out)!r} is not empty; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    base = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
    logger.info("downloading %s (version %s of %s) to %s", model_uri, mv.version, mv.name, out)
    with tempfile.TemporaryDirectory(prefix="mae-download-", dir=out.parent) as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=base, dst_path=tmp, tracking_uri=uri))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{model_uri}: cannot download the model ({_first_line(e)})") from None
        for item in local.iterdir():
            shutil.move(str(item), out / item.name)
    _verify(out / _ARTIFACT_SUBDIR / ARCH_FILE, mv.tags.get(ARCH_SHA_TAG), model_uri, ARCH_FILE)
    _verify(out / _ARTIFACT_SUBDIR / ENCODER_FILE, mv.tags.get(WEIGHTS_SHA_TAG), model_uri, ENCODER_FILE)
    _verify(out / _ARTIFACT_SUBDIR / MAE_FILE, mv.tags.get(MAE_SHA_TAG), model_uri, MAE_FILE)
    (out / "registry.json").write_text(json.dumps(_version_info(client, mv), indent=2, sort_keys=True) + "\n")
    return out


# ---- listing and aliases ------------------------------------------------------------------------------------
def _version_info(client: MlflowClient, mv: ModelVersion) -> dict[str, Any]:
    aliases = mv.aliases or [a for a, v in (client.get_registered_model(mv.name).aliases or {}).items()
                             if str(v) == str(mv.version)]
    return {
        "name": mv.name,
        "version": int(mv.version),
        "uri": f"models:/{mv.name}/{mv.version}",
        "aliases": sorted(aliases),
        "created": mv.creation_timestamp,
        "status": mv.status,
        "run_id": mv.run_id,
        "source": mv.source,
        "encoder": mv.tags.get(KIND_TAG) == KIND,
        "tags": dict(sorted(mv.tags.items())),
    }


@_with_tracking_uri
def list_versions(*, tracking_uri: str | None = None, name: str | None = None,
                  include_all: bool = False) -> list[dict[str, Any]]:
    """Registered versions (newest first within each model, models by name): mae-service encoders only unless
    ``include_all``. Each item as :func:`describe` returns it."""
    from mlflow.exceptions import MlflowException

    client, uri = connect(tracking_uri)
    try:
        if name is not None:
            names = [name]
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                raise ValueError(f"no registered model {name!r} at {uri}; registered models: "
                                 f"{_registered_names(client)}")
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
        raise ValueError(f"registry {uri} failed listing models: {_first_line(e)}") from None


@_with_tracking_uri
def describe(model_uri: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Everything the registry knows about one version: name, version, uri, aliases, created, status, run_id,
    source, encoder (bool), tags (lineage, checksums, evaluations), files (relative path → bytes)."""
    client, uri, mv = resolve(model_uri, tracking_uri)
    info = _version_info(client, mv)
    try:
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
        info["files"] = dict(sorted(files.items()))
    except Exception as e:  # noqa: BLE001 - the listing is a convenience; the metadata is what was asked
        logger.warning("cannot list the files of %s: %s", model_uri, _first_line(e))
        info["files"] = {}
    return info


@_with_tracking_uri
def promote(name: str, version: int | str, alias: str, *, tracking_uri: str | None = None) -> int | None:
    """Point ``alias`` of model ``name`` at ``version`` (an mae-service encoder); returns the version the alias
    pointed at before (None if it was new)."""
    from mlflow.exceptions import MlflowException

    check_alias(alias)
    if not str(version).isdigit() or int(version) < 1:
        raise ValueError(f"version {version!r}: must be a positive integer")
    client, uri, mv = resolve(f"models:/{name}/{int(version)}", tracking_uri)
    _check_encoder(client, mv, f"models:/{name}/{int(version)}")
    try:
        previous = (client.get_registered_model(name).aliases or {}).get(alias)
        client.set_registered_model_alias(name, alias, str(mv.version))
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed setting alias {alias!r}: {_first_line(e)}") from None
    logger.info("models:/%s@%s → version %s (was %s)", name, alias, mv.version, previous)
    return int(previous) if previous is not None else None


# ---- registration -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegisteredEncoder:
    """What :func:`register_encoder` created (``name`` and ``version`` as on an MLflow ``ModelVersion``)."""

    name: str
    version: int
    alias: str
    run_id: str
    model_id: str
    weights_sha256: str
    tracking_uri: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def _redact(value: str) -> str:
    """Drop credentials from a tag value: URL user-info, signed query strings, the values of secret env vars."""
    value = re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1", value)
    value = re.sub(r"\?[^\s]*(signature|token|credential|secret|password)[^\s]*", "", value, flags=re.IGNORECASE)
    for env in _SECRET_ENV:
        secret = os.environ.get(env)
        if secret and len(secret) >= 8 and secret in value:
            value = value.replace(secret, "<redacted>")
    return value


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags safe to store: keys that name a secret are dropped, values lose any credentials they carry."""
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if _SECRET_KEY.search(str(key)):
            logger.warning("not storing tag %r: its name looks like a credential", key)
            continue
        if value is None:
            continue
        out[str(key)] = _redact(str(value))[:5000]
    return out


def _stage_files(model: nn.Module, out: Path) -> dict[str, str]:
    """Write encoder/MAE safetensors and architecture.json into ``out``; return their sha256 by tag name."""
    from safetensors.torch import save_file

    from mae_service.model import IMAGENET_MEAN, IMAGENET_STD

    enc_state = {k: v.detach().cpu().contiguous() for k, v in model.encoder_state_dict_timm().items()}
    mae_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(enc_state, str(out / ENCODER_FILE), metadata={"format": FORMAT, "layout": "timm"})
    save_file(mae_state, str(out / MAE_FILE), metadata={"format": FORMAT, "layout": "mae"})
    timm_name, timm_kwargs = model.timm_architecture()
    arch = {
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
    (out / ARCH_FILE).write_text(json.dumps(arch, indent=2, sort_keys=True) + "\n")
    return {WEIGHTS_SHA_TAG: arch["weights_sha256"], MAE_SHA_TAG: arch["mae_weights_sha256"],
            ARCH_SHA_TAG: sha256_file(out / ARCH_FILE)}


def _pip_requirements() -> list[str]:
    """Pinned serving requirements (passed explicitly: MLflow then skips its slow requirement inference)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


@_with_tracking_uri
def register_encoder(
    model: nn.Module,
    *,
    tracking_uri: str,
    model_name: str,
    alias: str,
    run_id: str | None,
    tags: dict[str, str],
    checkpoint_uri: str | None = None,
    experiment: str | None = None,
) -> RegisteredEncoder:
    """Register ``model``'s encoder as a new version of ``model_name`` and point ``alias`` at it.

    Logs into run ``run_id`` (or a new run in ``experiment``, default ``mae-service``) an MLflow model with the
    safetensors weights, the architecture, the full MAE and the embedding pyfunc; creates the version with the
    lineage tags (``tags`` from the caller — ``data_uri``, ``config_digest``, ``steps``, ``final_loss`` … —
    plus what is derived here: mask ratio, decoder width/depth, checkpoint URI, source run, sha256 of the
    weights); then sets the alias. Tags whose name or value carries credentials are dropped/redacted.
    """
    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from mae_service.features import is_mae, unwrap

    model = unwrap(model)
    if not is_mae(model):
        raise ValueError(f"register_encoder needs a MaskedAutoencoder, got {type(model).__name__}")
    if not model_name or not isinstance(model_name, str) or "/" in model_name or "@" in model_name:
        raise ValueError(f"model_name {model_name!r}: must be a non-empty name without '/' or '@'")
    check_alias(alias)
    client, uri = connect(tracking_uri, must_exist=False)

    args = model.model_args
    derived = {
        "model_name": args.get("name", ""),
        "timm_name": model.timm_architecture()[0],
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "mask_ratio": model.mask_ratio,
        "norm_pix_loss": model.norm_pix_loss,
        "decoder_embed_dim": model.decoder_embed_dim,
        "decoder_depth": len(model.decoder_blocks),
        "checkpoint_uri": checkpoint_uri,
    }
    try:
        if run_id is None:
            exp_id = _experiment_id(client, experiment or "mae-service")
            run = client.create_run(exp_id, run_name=f"register-{model_name}")
            run_id, own_run = run.info.run_id, True
        else:
            try:
                exp_id = client.get_run(run_id).info.experiment_id
            except MlflowException:
                raise ValueError(f"run_id {run_id!r} does not exist at {uri}") from None
            own_run = False
        with tempfile.TemporaryDirectory(prefix="mae-register-") as tmp:
            shas = _stage_files(model, Path(tmp))
            version_tags = {**clean_tags({**derived, **tags}), **clean_tags(
                {"source_run": run_id, KIND_TAG: KIND, **shas})}
            embed_dim = int(model.embed_dim)
            example_side = min(int(model.img_size), 32)
            ramp = np.linspace(0, 255, example_side * example_side * 3).astype(np.uint8)
            signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, 3, -1, -1))]),
                                       outputs=Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim))]))
            logged = client.create_logged_model(exp_id, name=_LOGGED_MODEL_NAME, source_run_id=run_id,
                                                tags=version_tags, model_type="mae-encoder")
            Model.log(
                artifact_path=None, name=_LOGGED_MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=logged.model_id, python_model=str(_PYFUNC_FILE),
                artifacts={"weights": f"{tmp}/{ENCODER_FILE}", "architecture": f"{tmp}/{ARCH_FILE}",
                           "mae_weights": f"{tmp}/{MAE_FILE}"},
                signature=signature, input_example=ramp.reshape(1, 3, example_side, example_side),
                pip_requirements=_pip_requirements(),
            )
        if own_run:
            client.set_terminated(run_id)
        try:
            client.create_registered_model(model_name, description="ViT encoders pretrained as masked autoencoders "
                                           "by mae-service (load with mae_service.tracking.load_encoder)")
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(
            model_name, source=f"models:/{logged.model_id}", run_id=run_id, tags=version_tags,
            model_id=logged.model_id,
            description=f"{derived['timm_name']} ({derived['model_name']}, {model.img_size}px) from run {run_id}",
        )
        client.set_registered_model_alias(model_name, alias, str(mv.version))
    except MlflowException as e:
        raise ValueError(f"registering {model_name!r} at {uri} failed: {_first_line(e)}") from None
    logger.info("registered models:/%s/%s (alias @%s) from run %s", model_name, mv.version, alias, run_id)
    return RegisteredEncoder(name=model_name, version=int(mv.version), alias=alias, run_id=run_id,
                             model_id=logged.model_id, weights_sha256=shas[WEIGHTS_SHA_TAG], tracking_uri=uri,
                             tags=version_tags)


# ---- evaluations --------------------------------------------------------------------------------------------
@_with_tracking_uri
def record_eval(
    model_uri: str,
    metrics: dict[str, float],
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EVAL_EXPERIMENT,
    params: dict[str, Any] | None = None,
) -> str:
    """Log ``metrics`` (and ``params``) as an MLflow run in ``experiment`` and record them on the model version
    as ``eval.<metric>`` tags (plus ``eval.run_id``). Returns the evaluation run's id."""
    import math

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.time import get_current_time_millis

    if not metrics:
        raise ValueError("record_eval needs at least one metric")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {key}={value!r}: must be a finite number")
    client, uri, mv = resolve(model_uri, tracking_uri)
    _check_encoder(client, mv, model_uri)
    pinned = f"models:/{mv.name}/{mv.version}"
    try:
        run = client.create_run(_experiment_id(client, experiment), run_name=f"eval-{mv.name}-v{mv.version}",
                                tags={"mae_service.model_uri": pinned, "mae_service.asked_uri": str(model_uri)})
        now = get_current_time_millis()
        all_params = clean_tags({"model_uri": pinned, **(params or {})})
        client.log_batch(run.info.run_id,
                         metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         params=[Param(k, v[:6000]) for k, v in all_params.items()],
                         tags=[RunTag("mlflow.note.content", f"evaluation of {pinned}")])
        client.set_terminated(run.info.run_id)
        for key, value in metrics.items():
            client.set_model_version_tag(mv.name, mv.version, f"{EVAL_TAG_PREFIX}{key}", f"{float(value):.6g}")
        client.set_model_version_tag(mv.name, mv.version, f"{EVAL_TAG_PREFIX}run_id", run.info.run_id)
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed recording the evaluation of {model_uri}: {_first_line(e)}") from None
    return run.info.run_id
