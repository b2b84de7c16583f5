"""Writing to the model registry: register an encoder version, move an alias, record an evaluation.

:func:`register_encoder` (the driver calls it at the end of a successful run) logs the files of
:mod:`.artifacts` and the embedding pyfunc as an MLflow *logged model* linked to the training run, creates a
version carrying the lineage (data URI, config digest, mask ratio, decoder width/depth, steps, final loss,
checkpoint URI, source run) and every file's sha256, and points an alias at it. :func:`promote` moves an alias;
:func:`record_eval` logs an evaluation run and tags the version with its metrics. Lookups are :mod:`.registry`'s.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae_service.config.fields import model_name_problem
from mae_service.tracking.artifacts import (
    ARCH_FILE,
    ENCODER_FILE,
    EVAL_TAG_PREFIX,
    FILES_SHA_TAG,
    KIND,
    KIND_TAG,
    MAE_FILE,
    PYFUNC_FILE,
    WEIGHTS_SHA_TAG,
    stage_files,
)
from mae_service.tracking.registry import check_encoder, pinned_uri, resolve
from mae_service.tracking.runs import clean_tags, connect, ensure_experiment
from mae_service.tracking.uris import check_alias, error_code, first_line, with_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

    from mae_service.model import MaskedAutoencoder

logger = logging.getLogger(__name__)

DEFAULT_EVAL_EXPERIMENT = "mae-service-eval"
_LOGGED_MODEL_NAME = "encoder"
_DESCRIPTION = (
    "ViT encoders pretrained as masked autoencoders by mae-service (load with mae_service.tracking.load_encoder)"
)


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


# ---- registration -------------------------------------------------------------------------------------------
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


def _derived_tags(model: MaskedAutoencoder, checkpoint_uri: str | None) -> dict[str, Any]:
    """The lineage tags read off the model itself (the caller adds data URI, config digest, steps, loss …)."""
    return {
        "model_name": model.model_args.get("name", ""),
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


def _target_run(
    client: MlflowClient, uri: str, run_id: str | None, experiment: str | None, model_name: str
) -> tuple[str, str, bool]:
    """``(run id, experiment id, whether the run was created here)``: ``run_id``, or a new run in ``experiment``."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
        exp_id = ensure_experiment(client, experiment or "mae-service", uri)
        run = client.create_run(exp_id, run_name=f"register-{model_name}")
        return run.info.run_id, exp_id, True
    try:
        return run_id, client.get_run(run_id).info.experiment_id, False
    except MlflowException:
        raise ValueError(f"run_id {run_id!r} does not exist at {uri}") from None


def _log_model(
    client: MlflowClient, model: MaskedAutoencoder, exp_id: str, run_id: str, folder: str, tags: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """Log the staged files in ``folder`` and the pyfunc as a logged model of ``run_id``; returns its model id and
    the sha256 of every file uploaded (``{relative path: sha256}``).

    What ``mlflow.pyfunc.log_model`` does, in steps, so the model directory is hashed exactly as uploaded."""
    import shutil

    import mlflow
    import numpy as np
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from mae_service.tracking.artifacts import hash_tree

    side = min(int(model.img_size), 32)
    ramp = np.linspace(0, 255, side * side * 3).astype(np.uint8)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, int(model.embed_dim)))]),
    )
    logged = client.create_logged_model(
        exp_id, name=_LOGGED_MODEL_NAME, source_run_id=run_id, tags=tags, model_type="mae-encoder"
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        local = Path(folder) / "model"
        mlflow.pyfunc.save_model(
            path=str(local),
            mlflow_model=Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            ),
            python_model=str(PYFUNC_FILE),
            artifacts={
                "weights": f"{folder}/{ENCODER_FILE}",
                "architecture": f"{folder}/{ARCH_FILE}",
                "mae_weights": f"{folder}/{MAE_FILE}",
            },
            signature=signature,
            input_example=ramp.reshape(1, 3, side, side),
            pip_requirements=_pip_requirements(),
        )
        for cache in list(local.rglob("__pycache__")):
            shutil.rmtree(cache, ignore_errors=True)
        files = hash_tree(local)
        client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id, files


def _create_version(
    client: MlflowClient, model_name: str, model_id: str, run_id: str, tags: dict[str, str], description: str
) -> ModelVersion:
    """A new version of ``model_name`` (created if missing) whose source is the logged model ``model_id``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, description=_DESCRIPTION)
    except MlflowException as e:
        if error_code(e) != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(
        model_name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id, description=description
    )


CHECKPOINT_SHA_TAG = "checkpoint_sha256"  # sha256 of the checkpoint's model.safetensors, as its meta.json records it
# What makes two versions the same weights. Not the staged files' sha256: safetensors writes its header metadata in
# a varying order, so the same weights staged twice hash differently.
IDENTITY_TAGS = ("source_run", "checkpoint_uri", "steps", CHECKPOINT_SHA_TAG)


def registered_before(client: MlflowClient, model_name: str, run_id: str, tags: dict[str, str]) -> ModelVersion | None:
    """The complete version of ``model_name`` already made from these weights of run ``run_id`` (the same source run,
    checkpoint URI, step and checkpoint weights sha256 as ``tags``; None when ``tags`` lacks one of them), or None: registering is idempotent, so a resubmitted run
    whose registration was cut short (tracking server lost after the version was created, before the alias was set
    or the run closed) reuses its version instead of registering the same weights twice."""
    from mlflow.exceptions import MlflowException

    if not all(tags.get(k) for k in IDENTITY_TAGS):
        return None
    try:
        found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException as e:
        if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for mv in sorted(found, key=lambda v: int(v.version)):
        same = all(mv.tags.get(k) == tags.get(k) for k in IDENTITY_TAGS)
        if same and mv.tags.get(FILES_SHA_TAG) and str(mv.status) == "READY":
            return mv
    return None


def _checked_mae(model: nn.Module, model_name: str, alias: str) -> MaskedAutoencoder:
    from mae_service.model.export import is_mae, unwrap

    core = unwrap(model)
    if not is_mae(core):
        raise ValueError(f"register_encoder needs a MaskedAutoencoder, got {type(core).__name__}")
    if problem := model_name_problem(model_name):
        raise ValueError(f"model_name {model_name!r}: {problem}")
    check_alias(alias)
    return core


@with_tracking_uri
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
    weights and, in ``files_sha256``, of every file of the model directory); then sets the alias. Tags whose name or value carries credentials are dropped/redacted.
    """
    from mlflow.exceptions import MlflowException

    mae = _checked_mae(model, model_name, alias)
    client, uri = connect(tracking_uri, must_exist=False)
    derived = _derived_tags(mae, checkpoint_uri)
    try:
        run_id, exp_id, own_run = _target_run(client, uri, run_id, experiment, model_name)
        with tempfile.TemporaryDirectory(prefix="mae-register-") as tmp:
            shas = stage_files(mae, Path(tmp))
            version_tags = {
                **clean_tags({**derived, **tags}),
                **clean_tags({"source_run": run_id, KIND_TAG: KIND, **shas}),
            }
            mv = None if own_run else registered_before(client, model_name, run_id, version_tags)
            if mv is None:
                model_id, files = _log_model(client, mae, exp_id, run_id, tmp, version_tags)
        if mv is not None:  # a resubmit of a run whose registration was cut short: the same version, not a second
            logger.info("run %s's weights are already version %s of %s: reused", run_id, mv.version, model_name)
            model_id, version_tags = str(mv.model_id or ""), dict(mv.tags)
        else:
            version_tags[FILES_SHA_TAG] = json.dumps(files, sort_keys=True, separators=(",", ":"))
            if own_run:
                client.set_terminated(run_id)
            description = f"{derived['timm_name']} ({derived['model_name']}, {mae.img_size}px) from run {run_id}"
            mv = _create_version(client, model_name, model_id, run_id, version_tags, description)
        client.set_registered_model_alias(model_name, alias, str(mv.version))
    except MlflowException as e:
        raise ValueError(f"registering {model_name!r} at {uri} failed: {first_line(e)}") from None
    logger.info("registered models:/%s/%s (alias @%s) from run %s", model_name, mv.version, alias, run_id)
    return RegisteredEncoder(
        name=model_name,
        version=int(mv.version),
        alias=alias,
        run_id=run_id,
        model_id=model_id,
        weights_sha256=shas[WEIGHTS_SHA_TAG],
        tracking_uri=uri,
        tags=version_tags,
    )


# ---- aliases ------------------------------------------------------------------------------------------------
@with_tracking_uri
def promote(name: str, version: int | str, alias: str, *, tracking_uri: str | None = None) -> int | None:
    """Point ``alias`` of model ``name`` at ``version`` (an mae-service encoder); returns the version the alias
    pointed at before (None if it was new)."""
    from mlflow.exceptions import MlflowException

    check_alias(alias)
    if not str(version).isdigit() or int(version) < 1:
        raise ValueError(f"version {version!r}: must be a positive integer")
    client, uri, mv = resolve(f"models:/{name}/{int(version)}", tracking_uri)
    check_encoder(client, mv, f"models:/{name}/{int(version)}")
    try:
        previous = (client.get_registered_model(name).aliases or {}).get(alias)
        client.set_registered_model_alias(name, alias, str(mv.version))
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed setting alias {alias!r}: {first_line(e)}") from None
    logger.info("models:/%s@%s → version %s (was %s)", name, alias, mv.version, previous)
    return int(previous) if previous is not None else None


# ---- evaluations --------------------------------------------------------------------------------------------
@with_tracking_uri
def record_eval(
    model_uri: str,
    metrics: dict[str, float],
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EVAL_EXPERIMENT,
    params: dict[str, Any] | None = None,
    asked_uri: str | None = None,
) -> str:
    """Log ``metrics`` (and ``params``) as an MLflow run in ``experiment`` and record them on the model version
    as ``eval.<metric>`` tags (plus ``eval.run_id``). Returns the evaluation run's id.

    ``model_uri`` should be the pinned ``models:/NAME/VERSION`` that was scored (an alias is resolved here, and
    may have moved since the scoring); ``asked_uri`` is what the user asked for (default ``model_uri``), kept as
    the run's ``mae_service.asked_uri`` tag."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.utils.time import get_current_time_millis

    if not metrics:
        raise ValueError("record_eval needs at least one metric")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {key}={value!r}: must be a finite number")
    client, uri, mv = resolve(model_uri, tracking_uri)
    check_encoder(client, mv, model_uri)
    pinned = pinned_uri(mv)
    try:
        run = client.create_run(
            ensure_experiment(client, experiment, uri),
            run_name=f"eval-{mv.name}-v{mv.version}",
            tags={"mae_service.model_uri": pinned, "mae_service.asked_uri": str(asked_uri or model_uri)},
        )
        now = get_current_time_millis()
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in clean_tags({"model_uri": pinned, **(params or {})}).items()],
            tags=[RunTag("mlflow.note.content", f"evaluation of {pinned}")],
        )
        client.set_terminated(run.info.run_id)
        for key, value in metrics.items():
            client.set_model_version_tag(mv.name, mv.version, f"{EVAL_TAG_PREFIX}{key}", f"{float(value):.6g}")
        client.set_model_version_tag(mv.name, mv.version, f"{EVAL_TAG_PREFIX}run_id", run.info.run_id)
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed recording the evaluation of {model_uri}: {first_line(e)}") from None
    return run.info.run_id
