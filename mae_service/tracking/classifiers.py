"""Fine-tuned classifiers in the registry: register one, load it back, record its score on the source encoder.

A registered classifier is a model version (default name ``<source name>-ft``) whose MLflow logged model holds
``classifier.safetensors`` (the timm ``VisionTransformer`` classifier's state dict) and ``classifier.json`` (its
architecture, :func:`mae_service.model.classifier.classifier_architecture`, with class names and the source);
the version's tags carry both files' sha256, the kind ``classifier`` and the lineage (source model URI and
version, source pretraining run, fine-tuning run, protocol, data). :func:`load_classifier` verifies the files
against those checksums and loads the weights with safetensors (no pickle).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae_service.config.fields import model_name_problem
from mae_service.tracking.artifacts import EVAL_TAG_PREFIX, KIND_TAG, sha256_file, verify
from mae_service.tracking.registry import _download, resolve
from mae_service.tracking.runs import clean_tags, connect
from mae_service.tracking.uris import check_alias, error_code, first_line, with_tracking_uri

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

CLASSIFIER_KIND = "classifier"
WEIGHTS_FILE = "classifier.safetensors"
ARCH_FILE = "classifier.json"
WEIGHTS_SHA_TAG = "weights_sha256"
ARCH_SHA_TAG = "architecture_sha256"
_DESCRIPTION = "ViT classifiers fine-tuned from mae-service encoders (load with mae_service.tracking.load_classifier)"


@dataclass(frozen=True)
class RegisteredClassifier:
    name: str
    version: int
    alias: str
    weights_sha256: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@with_tracking_uri
def register_classifier(
    model: nn.Module,
    arch: dict[str, Any],
    *,
    tracking_uri: str,
    model_name: str,
    alias: str,
    run_id: str,
    tags: dict[str, Any],
) -> RegisteredClassifier:
    """Register ``model`` (built by :func:`~mae_service.model.classifier.create_classifier` from ``arch``) as a new
    version of ``model_name`` logged under run ``run_id``, with ``tags`` (lineage) and the files' sha256; point
    ``alias`` at it."""
    from mlflow.exceptions import MlflowException
    from safetensors.torch import save_file

    if problem := model_name_problem(model_name):
        raise ValueError(f"finetune.model_name={model_name!r}: {problem}")
    check_alias(alias)
    client, uri = connect(tracking_uri, must_exist=False)
    try:
        exp_id = client.get_run(run_id).info.experiment_id
        with tempfile.TemporaryDirectory(prefix="mae-classifier-") as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": arch["format"]})
            arch = {**arch, "weights_sha256": sha256_file(Path(tmp) / WEIGHTS_FILE)}
            (Path(tmp) / ARCH_FILE).write_text(json.dumps(arch, indent=2, sort_keys=True) + "\n")
            shas = {WEIGHTS_SHA_TAG: arch["weights_sha256"], ARCH_SHA_TAG: sha256_file(Path(tmp) / ARCH_FILE)}
            version_tags = clean_tags({**tags, KIND_TAG: CLASSIFIER_KIND, "fine_tune_run": run_id, **shas})
            logged = client.create_logged_model(
                exp_id, name="classifier", source_run_id=run_id, tags=version_tags, model_type="mae-classifier"
            )
            client.log_model_artifacts(logged.model_id, tmp)
        try:
            client.create_registered_model(model_name, description=_DESCRIPTION)
        except MlflowException as e:
            if error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(
            model_name,
            source=f"models:/{logged.model_id}",
            run_id=run_id,
            tags=version_tags,
            model_id=logged.model_id,
            description=f"{arch['timm_name']} classifier ({arch['num_classes']} classes) from run {run_id}",
        )
        client.set_registered_model_alias(model_name, alias, str(mv.version))
    except MlflowException as e:
        raise ValueError(f"registering {model_name!r} at {uri} failed: {first_line(e)}") from None
    logger.info("registered classifier models:/%s/%s (alias @%s)", model_name, mv.version, alias)
    return RegisteredClassifier(model_name, int(mv.version), alias, shas[WEIGHTS_SHA_TAG])


@with_tracking_uri
def load_classifier(model_uri: str, *, tracking_uri: str | None = None) -> nn.Module:
    """The registered classifier ``model_uri`` as a timm ``VisionTransformer`` (eval mode), weights verified
    against the sha256 recorded at registration. Input: normalised images ``[N, 3, S, S]`` (ImageNet mean/std,
    :func:`mae_service.model.normalize`); output logits ``[N, C]``. ``model.mae_classifier`` holds the architecture
    and ``class_names``."""
    from safetensors.torch import load_file

    from mae_service.model.classifier import CLASSIFIER_FORMAT, create_classifier

    client, uri, mv = resolve(model_uri, tracking_uri)
    if mv.tags.get(KIND_TAG) != CLASSIFIER_KIND:
        raise ValueError(
            f"{model_uri} (model {mv.name!r} version {mv.version}) is not an mae-service classifier "
            f"({KIND_TAG}={mv.tags.get(KIND_TAG)!r}); fine-tuned classifiers come from mae-service eval finetune"
        )
    with tempfile.TemporaryDirectory(prefix="mae-classifier-") as tmp:
        arch_path = _download(client, uri, mv, ARCH_FILE, tmp, model_uri)
        verify(arch_path, mv.tags.get(ARCH_SHA_TAG), model_uri, ARCH_FILE)
        w_path = _download(client, uri, mv, WEIGHTS_FILE, tmp, model_uri)
        verify(w_path, mv.tags.get(WEIGHTS_SHA_TAG), model_uri, WEIGHTS_FILE)
        arch = json.loads(arch_path.read_text())
        if arch.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(
                f"{model_uri}: {ARCH_FILE} has format {arch.get('format')!r}, expected {CLASSIFIER_FORMAT}"
            )
        model = create_classifier(arch)
        model.load_state_dict(load_file(str(w_path)), strict=True)
    return model.eval()


@with_tracking_uri
def record_finetune(
    pinned_source: str, protocol: str, metrics: dict[str, float | None], *, tracking_uri: str | None, run_id: str
) -> None:
    """Tag the source encoder version with ``eval.<protocol>_<metric>`` (e.g. ``eval.finetune_top1``) and
    ``eval.<protocol>_run_id``, as ``mae-service eval knn`` records ``eval.knn_top1``."""
    from mlflow.exceptions import MlflowException

    client, uri, mv = resolve(pinned_source, tracking_uri)
    try:
        for key, value in metrics.items():
            if value is not None:
                client.set_model_version_tag(mv.name, mv.version, f"{EVAL_TAG_PREFIX}{protocol}_{key}", f"{value:.6g}")
        client.set_model_version_tag(mv.name, mv.version, f"{EVAL_TAG_PREFIX}{protocol}_run_id", run_id)
    except MlflowException as e:
        raise ValueError(f"registry {uri} failed recording the fine-tune of {pinned_source}: {first_line(e)}") from None
