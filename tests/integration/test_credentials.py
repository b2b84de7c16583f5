"""A tracking server that wants credentials, given as ``http://user:password@host`` (issue 13): reachable, and the
password appears in no output, param, config artifact or checkpoint. The server is ``mlflow server`` behind a
basic-auth proxy (as nginx would be); the credentials travel in MLflow's own auth variables."""

from __future__ import annotations

import json

import pytest

from mae_service.config import build_config
from mae_service.config.fields import AUTH_ENV
from mae_service.tracking.runs import connect, ensure_experiment, open_run, tracking_problem
from tests.servers import BasicAuthProxy

USER, PASSWORD = "mae", "Pa55-w0rd-x7"


@pytest.fixture(scope="module")
def guarded(mlflow_server):
    proxy = BasicAuthProxy(mlflow_server.uri, USER, PASSWORD)
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def _no_auth_env(monkeypatch):
    for key in AUTH_ENV:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_credentials_in_the_uri_reach_the_server_and_are_stored_nowhere(guarded, experiment_name, tmp_path):
    import mlflow

    uri = guarded.uri(USER, PASSWORD)
    assert tracking_problem(uri, must_exist=False) is None
    cfg = build_config({}, [f"mlflow.tracking_uri={uri}", f"mlflow.experiment={experiment_name}"])
    assert cfg.mlflow.tracking_uri == guarded.uri()  # the config holds the bare URI ...
    client, resolved = connect(cfg.mlflow.tracking_uri, must_exist=False)  # ... and MLflow's env the credentials
    assert resolved == guarded.uri()
    exp = ensure_experiment(client, experiment_name, resolved)
    run_id = open_run(client, exp, run_name="r", key_tags={"mae.run_name": "r"}, params=cfg.flat())
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    client.set_terminated(run_id)
    run = mlflow.MlflowClient(resolved).get_run(run_id)
    assert run.data.params["mlflow.tracking_uri"] == guarded.uri()
    stored = json.dumps([run.data.params, run.data.tags, cfg.to_dict()]) + cfg.to_yaml()
    assert PASSWORD not in stored


def test_cli_with_credentials_answers_and_never_prints_the_password(guarded, cli):
    rc, out, err = cli("models", "list", "--tracking-uri", guarded.uri(USER, PASSWORD))
    assert rc == 0, err
    rc, out, err = cli("models", "list", "--name", "ghost", "--tracking-uri", guarded.uri(USER, PASSWORD))
    assert rc == 2 and "no registered model 'ghost'" in err and f"127.0.0.1:{guarded.port}" in err
    assert PASSWORD not in out + err


def test_wrong_or_missing_credentials_are_named(guarded, cli, monkeypatch):
    wrong = "Wr0ng-pa55word"
    rc, out, err = cli("models", "list", "--tracking-uri", guarded.uri(USER, wrong))
    assert rc == 2 and "HTTP 401" in err and f"user {USER!r} were refused" in err, err
    assert wrong not in out + err
    for key in AUTH_ENV:  # the credentials of the call before stay in this process's environment
        monkeypatch.delenv(key)
    rc, _, err = cli("models", "list", "--tracking-uri", guarded.uri())
    assert rc == 2 and "needs credentials" in err and "MLFLOW_TRACKING_USERNAME" in err, err
