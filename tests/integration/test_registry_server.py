"""The model registry behind a real ``mlflow server`` (SQLite store, artifacts on the S3 server): register → list →
show → download → load, a tampered S3 object, and ``mlflow models serve`` answering an HTTP request."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch

from mae_service.cli import main
from mae_service.evaluation import embed
from mae_service.model import create_model
from mae_service.tracking import describe, download, list_versions, load_encoder, load_mae, record_eval
from mae_service.tracking import register_encoder as register
from tests.servers import BIN, QUIET_ENV, free_port, stop_pid, wait_http

IMAGES = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def tiny_mae(seed: int):
    torch.manual_seed(seed)
    return create_model(
        "mae_vit_tiny_patch16", img_size=32, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4
    ).eval()


@pytest.fixture(scope="module")
def registered(mlflow_server):
    """Version 1 of a fresh model name on the server, registered into an existing training run."""
    import mlflow

    name = f"enc-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment(f"registry-server-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id, run_name="pretrain")
    client.set_terminated(run.info.run_id)
    model = tiny_mae(0)
    reg = register(
        model,
        tracking_uri=mlflow_server.uri,
        model_name=name,
        alias="current",
        run_id=run.info.run_id,
        tags={"data_uri": "s3://data/train", "steps": "5", "final_loss": "1.25", "config_digest": "d1"},
        checkpoint_uri="s3://ckpt/run/checkpoint_000005",
    )
    return {"name": name, "model": model, "reg": reg, "uri": mlflow_server.uri, "run_id": run.info.run_id}


def _s3_keys(s3_server, bucket: str = "mlflow-artifacts") -> list[str]:
    c = s3_server.client()
    return [
        o["Key"]
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]


def test_register_list_show_download_load_through_the_server(registered, s3_server, tmp_path, capsys):
    import mlflow

    name, uri, reg, model = registered["name"], registered["uri"], registered["reg"], registered["model"]
    assert reg.run_id == registered["run_id"] and reg.version == 1
    # the weights are on S3, under the logged model linked to the training run
    keys = [k for k in _s3_keys(s3_server) if reg.model_id in k]
    assert any(k.endswith("artifacts/encoder.safetensors") for k in keys), keys
    assert any(k.endswith("artifacts/mae.safetensors") for k in keys)
    run = mlflow.MlflowClient(uri).get_run(reg.run_id)
    assert run.info.status == "FINISHED"  # logging into a finished run leaves it finished
    assert [m.model_id for m in run.outputs.model_outputs] == [reg.model_id]

    rows = list_versions(tracking_uri=uri, name=name)
    assert [(r["version"], r["aliases"]) for r in rows] == [(1, ["current"])]
    info = describe(f"models:/{name}@current", tracking_uri=uri)
    assert info["tags"]["checkpoint_uri"] == "s3://ckpt/run/checkpoint_000005"
    assert info["tags"]["source_run"] == reg.run_id and info["files"]["artifacts/encoder.safetensors"] > 0

    assert main(["models", "show", f"models:/{name}@current", "--tracking-uri", uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tags"]["weights_sha256"] == reg.weights_sha256

    out = download(f"models:/{name}@current", tmp_path / "dl", tracking_uri=uri)
    assert (out / "artifacts" / "encoder.safetensors").stat().st_size == info["files"]["artifacts/encoder.safetensors"]

    encoder = load_encoder(f"models:/{name}@current", tracking_uri=uri)
    torch.testing.assert_close(embed(encoder, IMAGES), embed(model, IMAGES), rtol=1e-5, atol=1e-5)
    mae = load_mae(f"models:/{name}/1", tracking_uri=uri)
    assert torch.equal(mae.decoder_pred.weight, model.decoder_pred.weight)

    run_id = record_eval(f"models:/{name}@current", {"knn_top1": 0.25}, tracking_uri=uri)
    assert describe(f"models:/{name}/1", tracking_uri=uri)["tags"]["eval.run_id"] == run_id


def _register_and_find(mlflow_server, s3_server, seed, prefix, suffix):
    """Register a tiny encoder through the server; return it and the S3 key of its artifact ending in ``suffix``."""
    reg = register(
        tiny_mae(seed),
        tracking_uri=mlflow_server.uri,
        model_name=f"{prefix}-{uuid.uuid4().hex[:8]}",
        alias="current",
        run_id=None,
        tags={},
        experiment=f"{prefix}-{uuid.uuid4().hex[:8]}",
    )
    return reg, next(k for k in _s3_keys(s3_server) if reg.model_id in k and k.endswith(suffix))


def test_tampered_object_on_s3_is_refused(mlflow_server, s3_server):
    uri = mlflow_server.uri
    reg, key = _register_and_find(mlflow_server, s3_server, 1, "tamper", "artifacts/encoder.safetensors")
    c = s3_server.client()
    body = bytearray(c.get_object(Bucket="mlflow-artifacts", Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    c.put_object(Bucket="mlflow-artifacts", Key=key, Body=bytes(body))
    with pytest.raises(ValueError, match=rf"{reg.alias_uri}.*encoder.safetensors.*refusing"):
        load_encoder(reg.alias_uri, tracking_uri=uri)


def test_tampered_pyfunc_code_on_s3_is_refused_and_never_runs(mlflow_server, s3_server, tmp_path):
    uri = mlflow_server.uri
    reg, key = _register_and_find(mlflow_server, s3_server, 2, "code", "/encoder_pyfunc.py")
    marker = tmp_path / "injected-code-ran"
    c = s3_server.client()
    code = c.get_object(Bucket="mlflow-artifacts", Key=key)["Body"].read().decode()
    injected = code + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    c.put_object(Bucket="mlflow-artifacts", Key=key, Body=injected.encode())

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "mae_service",
            "models",
            "download",
            reg.alias_uri,
            str(out),
            "--tracking-uri",
            uri,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **QUIET_ENV},
    )
    assert proc.returncode == 2, proc.stderr
    assert "encoder_pyfunc.py changed" in proc.stderr and "refusing" in proc.stderr
    assert "verified" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no staging folder, no marker
    with pytest.raises(ValueError, match=rf"{reg.alias_uri}: encoder_pyfunc.py changed.*refusing"):
        load_encoder(reg.alias_uri, tracking_uri=uri)
    assert not marker.exists()
    # the injected code is live: MLflow's own loader (no checks) runs it
    subprocess.run(
        [str(BIN / "python"), "-c", f"import mlflow; mlflow.pyfunc.load_model({reg.alias_uri!r})"],
        capture_output=True,
        timeout=300,
        env={**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": uri},
        cwd=tmp_path,
    )
    assert marker.read_text() == "ran"


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_embedding_requests(registered, tmp_path):
    name, model = registered["name"], registered["model"]
    port = free_port()
    env = {
        **os.environ,
        **QUIET_ENV,
        "MLFLOW_TRACKING_URI": registered["uri"],
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # the server execs uvicorn from PATH
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{name}@current",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 150, proc)
        except Exception:
            log.flush()
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:]) from None
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = _post(url, {"inputs": IMAGES.tolist()})
        assert status == 200, body
        pred = np.asarray(body["predictions"], dtype=np.float32)
        assert pred.shape == (3, 192)
        np.testing.assert_allclose(pred, embed(model, IMAGES).numpy(), rtol=1e-4, atol=1e-4)
        # another image size is resized by the model; values outside uint8 are a client error
        status, body = _post(url, {"instances": torch.zeros(1, 3, 48, 48, dtype=torch.uint8).tolist()})
        assert status == 200 and np.asarray(body["predictions"]).shape == (1, 192)
        status, body = _post(url, {"inputs": [[[[300]]]]})
        assert status == 400 and "uint8" in body.get("message", "")
    finally:
        stop_pid(proc)
        log.close()
