"""MLflow runs: connecting, reachability, experiments, run records (parent/child), and keeping secrets out.

Owns every MLflow *tracking* call the driver, the sweep and the registry share: resolve and check a tracking
URI, find or create an experiment, find a run by its mae-service tag or create it with the config as params,
and scrub credentials from anything stored. Imports MLflow lazily; nothing from ``mae_service`` above it.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from mae_service.config.fields import AUTH_ENV, adopt_credentials
from mae_service.config.secrets import _SECRET_ENV, redact  # noqa: F401 - redact is this module's API too
from mae_service.runtime import ExitError

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "mae.run_name"
"""Tag that names a pretraining run: resubmitting the same ``train.run_name`` finds its MLflow run by it."""
SWEEP_TAG = "mae.sweep_name"
ROLE_TAG = "mae.role"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; the whole config also goes in as config.yaml

_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_?key|api_?key|session", re.IGNORECASE)


class TrackingUnavailableError(ExitError):
    """The tracking store stopped answering after training (or while its records were replayed): what could not be
    recorded is kept in the run's MLflow spool, and a resubmit of the same command finishes the record (exit 2)."""


# ---- keeping credentials out --------------------------------------------------------------------------------
def sanitize_uri(uri: str) -> str:
    """Drop any ``user:password@`` from a URI before it is logged or stored."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=host))
    return uri


def clean_tags(tags: dict[str, Any] | None, max_chars: int = 5000) -> dict[str, str]:
    """Tags/params safe to store: keys that name a secret are dropped, values lose any credentials they carry."""
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if _SECRET_KEY.search(str(key)):
            logger.warning("not storing %r: its name looks like a credential", key)
            continue
        if value is None:
            continue
        out[str(key)] = redact(str(value))[:max_chars]
    return out


# ---- where the tracking store is, and whether it answers ------------------------------------------------------
def resolve_tracking_uri(uri: str | None) -> str:
    """``uri`` (default: MLflow's, i.e. ``$MLFLOW_TRACKING_URI``); a relative ``sqlite:///x.db`` becomes absolute,
    so Ray workers (another working directory) write to the same file. ``http://user:password@host``: the
    credentials move to ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` and the URI loses them."""
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    uri = adopt_credentials(uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def tracking_problem(uri: str, *, must_exist: bool, timeout: float = 5.0) -> str | None:
    """None when the tracking store at ``uri`` can be used; else the problem, in one line.

    HTTP: the server must answer ``/health`` (any HTTP status counts as an answer). SQLite: the file must exist
    for lookups (``must_exist``), its folder for runs that create it. ``file:`` stores: MLflow 3 has no registry
    on them.
    """
    uri = adopt_credentials(uri)
    shown = sanitize_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (perhaps 401/404): reachable
        except (urllib.error.URLError, OSError) as e:
            return (
                f"MLflow tracking server {shown} is unreachable ({getattr(e, 'reason', e)}); start it or give "
                "the URI of a running one (mlflow.tracking_uri, --tracking-uri or MLFLOW_TRACKING_URI)"
            )
        return _auth_problem(uri, shown, timeout)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if not path or path == ":memory:":
            return None
        if must_exist and not os.path.isfile(path):
            return (
                f"no MLflow registry at {uri}: {path} does not exist (give --tracking-uri or MLFLOW_TRACKING_URI "
                "of the registry the model was registered in)"
            )
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            return f"mlflow.tracking_uri={uri!r}: folder {folder!r} does not exist"
        return None
    if uri.startswith("file:") or "://" not in uri:
        return (
            f"tracking URI {shown!r}: MLflow 3 needs a database or server URI (sqlite:///mlflow.db, http://host:5000)"
        )
    return _database_driver_problem(uri, shown)


_DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "MySQLdb": "mysqlclient",
    "pymysql": "pymysql",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}
"""Python module SQLAlchemy imports for a database URI → the pip package that provides it."""


def _database_driver_problem(uri: str, shown: str) -> str | None:
    """A database tracking URI (``postgresql://``, ``mysql+pymysql://`` …) whose SQLAlchemy dialect or driver
    package is missing: say which package to install (MLflow would fail with a traceback at the first call)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if uri.split("://", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql", "mssql"):
        return None  # not a database MLflow stores runs in (e.g. a tracking plugin's scheme): MLflow decides
    other = "or use sqlite:///mlflow.db or an http:// MLflow server"
    try:
        dialect = make_url(uri).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        return f"mlflow.tracking_uri={shown!r}: not a database or server URI MLflow can use ({e}); {other}"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        module = (e.name or str(e)).split(".")[0]
        package = _DRIVER_PACKAGES.get(module, module)
        return (
            f"mlflow.tracking_uri={shown!r}: the {dialect.name} driver needs the Python package {package!r} "
            f"(module {module!r}), which is not installed; pip install '{package}', {other}"
        )
    return None


def _auth_problem(uri: str, shown: str, timeout: float) -> str | None:
    """None unless the server at ``uri`` refuses an API call (HTTP 401/403) made with the credentials MLflow's client
    would send (:data:`AUTH_ENV`)."""
    import base64

    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = (os.environ.get(k) for k in AUTH_ENV)
    if user or password:
        token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            return None
        given = f"the credentials of user {user!r} were refused" if user or password else "it needs credentials"
        return (
            f"MLflow tracking server {shown} answered HTTP {e.code}: {given}; put USER:PASSWORD@ before the "
            "host in the URI, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    except (urllib.error.URLError, OSError):
        return None  # /health answered: let MLflow's client report what follows


def check_reachable(uri: str, *, must_exist: bool = True) -> None:
    """ValueError with :func:`tracking_problem`'s line when the tracking store cannot be used."""
    problem = tracking_problem(uri, must_exist=must_exist)
    if problem:
        raise ValueError(problem)


def connect(tracking_uri: str | None = None, *, must_exist: bool = True) -> tuple[MlflowClient, str]:
    """``(client, resolved tracking URI)`` after checking the store answers; the registry URI is the tracking URI."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri, must_exist=must_exist)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


# ---- experiments and runs -------------------------------------------------------------------------------------
def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if missing. With a SQLite store its artifacts go to ``mlartifacts``
    next to the database (not the current directory). Safe against a concurrent creation."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///") :]), "mlartifacts")
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _tag_filter(tags: dict[str, str]) -> str:
    for k, v in tags.items():
        if "'" in str(v) or "`" in str(k):
            raise ValueError(f"cannot look up runs by {k}={v!r}: quotes are not allowed in names")
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the (newest) run of ``experiment_id`` carrying all ``tags``, or None."""
    found = client.search_runs([experiment_id], filter_string=_tag_filter(tags), max_results=1)
    return found[0].info.run_id if found else None


def find_run_by_name(client: MlflowClient, experiment: str, run_name: str) -> str | None:
    """The MLflow run of pretraining run ``run_name`` in ``experiment`` (by :data:`RUN_NAME_TAG`), or None."""
    exp = client.get_experiment_by_name(experiment)
    return find_run(client, exp.experiment_id, {RUN_NAME_TAG: run_name}) if exp is not None else None


def open_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    run_name: str,
    key_tags: dict[str, str],
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> str:
    """Continue or create the run identified by ``key_tags`` (or ``run_id``): a found run is set RUNNING again;
    a new one gets ``key_tags`` + ``tags`` and ``params`` (credentials scrubbed, values cut to MLflow's limit)."""
    from mlflow.entities import Param

    run_id = run_id or find_run(client, experiment_id, key_tags)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={**key_tags, **clean_tags(tags)})
    safe = clean_tags(
        {k: sanitize_uri(v) if isinstance(v, str) else str(v) for k, v in params.items()}, max_chars=MAX_PARAM_CHARS
    )
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in safe.items()])
    return run.info.run_id
