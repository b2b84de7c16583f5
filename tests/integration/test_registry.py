"""The model registry on the embedded default store (``sqlite:///…`` + local artifacts): register → list → show →
download → load, aliases, a fresh process without mae_service, tampering, and the CLI's bad-input answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_service.evaluation import embed
from mae_service.model import create_model
from mae_service.tracking import describe, list_versions, load_encoder, load_mae, promote, record_eval
from mae_service.tracking import register_encoder as register
from tests.servers import free_port

NAME = "tiny-encoder"


def tiny_mae(seed: int):
    torch.manual_seed(seed)
    return create_model(
        "mae_vit_tiny_patch16",
        img_size=32,
        depth=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=4,
        mask_ratio=0.6,
    ).eval()


IMAGES = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An embedded registry (SQLite file + artifacts in a folder beside it) holding version 1 of NAME."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # MLflow's default artifact root for a SQLite store is ./mlruns of the current folder: keep it in tmp
    cwd = os.getcwd()
    os.chdir(root)
    try:
        model = tiny_mae(0)
        reg = register(
            model,
            tracking_uri=uri,
            model_name=NAME,
            alias="current",
            run_id=None,
            tags={
                "data_uri": "s3://user:hunter22@bucket/train?X-Amz-Signature=abc",
                "steps": "12",
                "final_loss": "0.75",
                "config_digest": "abc123",
                "aws_secret_access_key": "nope",
            },
            checkpoint_uri="s3://bucket/ckpt/run/checkpoint_000012",
        )
        yield {"uri": uri, "root": root, "model": model, "reg": reg}
    finally:
        os.chdir(cwd)


def test_register_list_show_download_load(registry, cli, tmp_path):
    uri, reg, model = registry["uri"], registry["reg"], registry["model"]
    assert (reg.name, reg.version, reg.alias) == (NAME, 1, "current")
    assert reg.uri == f"models:/{NAME}/1" and reg.alias_uri == f"models:/{NAME}@current"

    # lineage + checksums on the version; no credentials anywhere
    tags = describe(f"models:/{NAME}@current", tracking_uri=uri)["tags"]
    assert tags["data_uri"] == "s3://bucket/train"
    assert tags["checkpoint_uri"] == "s3://bucket/ckpt/run/checkpoint_000012"
    assert tags["mask_ratio"] == "0.6" and tags["decoder_embed_dim"] == "32" and tags["decoder_depth"] == "1"
    assert tags["steps"] == "12" and tags["final_loss"] == "0.75" and tags["config_digest"] == "abc123"
    assert tags["source_run"] == reg.run_id and tags["weights_sha256"] == reg.weights_sha256
    assert "aws_secret_access_key" not in tags and "hunter22" not in json.dumps(tags)

    rows = list_versions(tracking_uri=uri)
    assert [(r["name"], r["version"]) for r in rows if r["name"] == NAME][-1] == (NAME, 1)

    rc, out, _ = cli("models", "list", "--tracking-uri", uri)
    assert rc == 0 and NAME in out and "@current" in out
    rc, out, _ = cli("models", "show", f"models:/{NAME}@current", "--tracking-uri", uri)
    assert rc == 0
    assert "weights_sha256" in out and reg.weights_sha256 in out and "artifacts/encoder.safetensors" in out
    assert f"load_encoder('models:/{NAME}@current')" in out

    # download: the whole model folder, verified, with the registry record
    out_dir = tmp_path / "dl"
    rc, out, err = cli("models", "download", f"models:/{NAME}/1", str(out_dir), "--hf", "--tracking-uri", uri)
    assert rc == 0, err
    hf_config = json.loads((out_dir / "hf" / "config.json").read_text())  # Hugging Face ViTMAE layout
    assert (
        hf_config["hidden_size"] == 192
        and hf_config["image_size"] == 32
        and (out_dir / "hf/model.safetensors").is_file()
    )
    for rel in (
        "MLmodel",
        "encoder_pyfunc.py",
        "requirements.txt",
        "artifacts/encoder.safetensors",
        "artifacts/mae.safetensors",
        "artifacts/architecture.json",
        "registry.json",
    ):
        assert (out_dir / rel).is_file(), rel
    assert json.loads((out_dir / "registry.json").read_text())["tags"]["weights_sha256"] == reg.weights_sha256
    reqs = (out_dir / "requirements.txt").read_text()
    assert "timm==" in reqs and "torch==" in reqs and "mae" not in reqs
    rc, _, err = cli("models", "download", f"models:/{NAME}/1", str(out_dir), "--tracking-uri", uri)
    assert rc == 2 and "not empty" in err

    # load: same features as the training-time model
    encoder = load_encoder(f"models:/{NAME}@current", tracking_uri=uri)
    assert type(encoder).__name__ == "VisionTransformer" and not encoder.training
    torch.testing.assert_close(embed(encoder, IMAGES), embed(model, IMAGES), rtol=1e-5, atol=1e-5)
    mae = load_mae(f"models:/{NAME}/1", tracking_uri=uri)
    for k, v in model.state_dict().items():
        assert torch.equal(mae.state_dict()[k], v), k
    assert mae.mask_ratio == 0.6

    # the pyfunc from the downloaded folder gives the same embeddings
    import mlflow

    pf = mlflow.pyfunc.load_model(str(out_dir))
    np.testing.assert_allclose(pf.predict(IMAGES.numpy()), embed(model, IMAGES).numpy(), rtol=1e-5, atol=1e-5)
    sig = pf.metadata.signature
    assert sig.inputs.inputs[0].type == np.dtype("uint8") and sig.outputs.inputs[0].shape == (-1, 192)


def test_aliases_move_on_register_and_promote_and_evaluations_are_recorded(registry, cli):
    uri = registry["uri"]
    v2_model = tiny_mae(1)
    reg2 = register(v2_model, tracking_uri=uri, model_name=NAME, alias="current", run_id=None, tags={})
    assert reg2.version == 2
    info1 = describe(f"models:/{NAME}/1", tracking_uri=uri)
    info2 = describe(f"models:/{NAME}@current", tracking_uri=uri)
    assert info1["aliases"] == [] and info2["version"] == 2 and info2["aliases"] == ["current"]
    torch.testing.assert_close(
        embed(load_encoder(f"models:/{NAME}@current", tracking_uri=uri), IMAGES),
        embed(v2_model, IMAGES),
        rtol=1e-5,
        atol=1e-5,
    )
    assert describe(f"models:/{NAME}/latest", tracking_uri=uri)["version"] == 2

    rc, out, _ = cli("models", "promote", NAME, "1", "--alias", "current", "--tracking-uri", uri)
    assert rc == 0 and "was version 2" in out
    rc, out, _ = cli("models", "promote", NAME, "2", "--alias", "production", "--tracking-uri", uri)
    assert rc == 0 and "new alias" in out
    assert describe(f"models:/{NAME}@current", tracking_uri=uri)["version"] == 1
    assert promote(NAME, 2, "current", tracking_uri=uri) == 1
    assert promote(NAME, 1, "current", tracking_uri=uri) == 2
    torch.testing.assert_close(
        embed(load_encoder(f"models:/{NAME}@current", tracking_uri=uri), IMAGES),
        embed(registry["model"], IMAGES),
        rtol=1e-5,
        atol=1e-5,
    )

    run_id = record_eval(
        f"models:/{NAME}@production",
        {"knn_top1": 0.625, "linear_probe_top1": 0.5},
        tracking_uri=uri,
        params={"train_data": "/data/train"},
    )
    tags = describe(f"models:/{NAME}/2", tracking_uri=uri)["tags"]
    assert tags["eval.knn_top1"] == "0.625" and tags["eval.run_id"] == run_id
    import mlflow

    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["knn_top1"] == 0.625 and run.data.params["model_uri"] == f"models:/{NAME}/2"
    rc, out, _ = cli("models", "list", "--tracking-uri", uri)
    assert "0.625" in out


def test_fresh_process_without_mae_service_loads_by_alias(registry, tmp_path):
    """Only timm, torch, safetensors and mlflow: `import mae_service` is blocked in the child."""
    uri, model = registry["uri"], registry["model"]
    np.save(tmp_path / "images.npy", IMAGES.numpy())
    expected = embed(model, IMAGES).numpy()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mae_service"] = None  # any import of the package now fails
        import json, numpy as np, mlflow, timm
        from safetensors.torch import load_file
        import torch
        mlflow.set_tracking_uri({uri!r})
        images = np.load({str(tmp_path / "images.npy")!r})
        pyfunc = mlflow.pyfunc.load_model("models:/{NAME}@current")
        a = pyfunc.predict(images)
        folder = mlflow.artifacts.download_artifacts("models:/{NAME}@current")
        arch = json.load(open(folder + "/artifacts/architecture.json"))
        enc = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"]).eval()
        enc.load_state_dict(load_file(folder + "/artifacts/encoder.safetensors"), strict=True)
        mean = torch.tensor(arch["mean"]).view(1, 3, 1, 1); std = torch.tensor(arch["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            b = enc((torch.from_numpy(images).float() / 255 - mean) / std).numpy()
        np.save({str(tmp_path / "a.npy")!r}, a); np.save({str(tmp_path / "b.npy")!r}, b)
        print("ok", "mae_service" in sys.modules and sys.modules["mae_service"] is not None)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok False")
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), expected, rtol=1e-5, atol=1e-5)


def test_tampered_or_truncated_artifacts_are_refused(registry, cli):
    uri = registry["uri"]
    reg = register(tiny_mae(3), tracking_uri=uri, model_name="tamper-me", alias="current", run_id=None, tags={})
    import mlflow

    location = mlflow.MlflowClient(uri).get_model_version_download_uri(reg.name, str(reg.version))
    base = Path(urllib.parse.urlsplit(location).path if location.startswith("file:") else location)
    weights, mae_file = base / "artifacts" / "encoder.safetensors", base / "artifacts" / "mae.safetensors"
    assert load_encoder(reg.alias_uri, tracking_uri=uri) is not None

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"models:/tamper-me@current.*encoder.safetensors.*sha256"):
        load_encoder(reg.alias_uri, tracking_uri=uri)
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="truncated or was modified"):
        load_encoder(reg.alias_uri, tracking_uri=uri)
    rc, _, err = cli("models", "download", reg.alias_uri, str(registry["root"] / "dl-tampered"), "--tracking-uri", uri)
    assert rc == 2 and "refusing" in err and len(err.strip().splitlines()) == 1

    mae_file.write_bytes(mae_file.read_bytes()[:-8])
    with pytest.raises(ValueError, match="mae.safetensors"):
        load_mae(reg.uri, tracking_uri=uri)


def _store_folder(uri: str, reg) -> Path:
    import mlflow

    location = mlflow.MlflowClient(uri).get_model_version_download_uri(reg.name, str(reg.version))
    return Path(urllib.parse.urlsplit(location).path if location.startswith("file:") else location)


def _inject(code_file: Path, marker: Path) -> None:
    """Append code that leaves ``marker`` behind when the pyfunc file is imported (as MLflow's loader does)."""
    code_file.write_text(code_file.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")


def test_tampered_pyfunc_code_is_refused_before_it_lands_or_runs(registry, cli, tmp_path):
    uri = registry["uri"]
    reg = register(tiny_mae(4), tracking_uri=uri, model_name="code-tamper", alias="current", run_id=None, tags={})
    manifest = json.loads(describe(reg.uri, tracking_uri=uri)["tags"]["files_sha256"])
    assert {"MLmodel", "encoder_pyfunc.py", "requirements.txt", "artifacts/encoder.safetensors"} <= set(manifest)
    base = _store_folder(uri, reg)
    marker = tmp_path / "injected-code-ran"
    pristine = (base / "encoder_pyfunc.py").read_text()
    _inject(base / "encoder_pyfunc.py", marker)

    work = tmp_path / "work"
    (work / "empty").mkdir(parents=True)
    (work / "full").mkdir()
    (work / "full" / "keep.txt").write_text("mine")
    for out in (work / "new" / "out", work / "empty"):
        rc, _, err = cli("models", "download", reg.alias_uri, str(out), "--tracking-uri", uri)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "encoder_pyfunc.py changed" in err and "refusing" in err, err
    rc, _, err = cli("models", "download", reg.alias_uri, str(work / "full"), "--tracking-uri", uri)
    assert rc == 2 and "not empty" in err
    # nothing landed: no OUT created, the empty one still empty, the full one as it was, no staging left over
    assert sorted(p.name for p in work.iterdir()) == ["empty", "full"]
    assert list((work / "empty").iterdir()) == [] and (work / "full" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (work / "full").iterdir()] == ["keep.txt"]
    for load in (load_encoder, load_mae):
        with pytest.raises(ValueError, match=r"models:/code-tamper@current: encoder_pyfunc.py changed.*refusing"):
            load(reg.alias_uri, tracking_uri=uri)
    assert not marker.exists()

    # the injected code is live: MLflow's own loader, which checks nothing, runs it
    subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model({str(base)!r})"],
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert marker.read_text() == "ran"

    # an added file is refused as well (loads read only recorded files, so they still work)
    (base / "encoder_pyfunc.py").write_text(pristine)
    shutil.rmtree(base / "__pycache__", ignore_errors=True)
    (base / "artifacts" / "extra.py").write_text("print('hi')\n")
    rc, _, err = cli("models", "download", reg.uri, str(work / "new"), "--tracking-uri", uri)
    assert rc == 2 and "artifacts/extra.py not part of the registered version" in err, err
    assert not (work / "new").exists()
    assert load_encoder(reg.uri, tracking_uri=uri) is not None
    (base / "artifacts" / "extra.py").unlink()
    rc, out, err = cli("models", "download", reg.uri, str(work / "new"), "--tracking-uri", uri)
    assert rc == 0 and "every file verified" in out, err
    assert sorted(p.relative_to(work / "new").as_posix() for p in (work / "new").rglob("*") if p.is_file()) == sorted(
        [*manifest, "registry.json"]
    )


def test_versions_registered_before_file_checksums_still_load_with_a_warning(registry, cli, tmp_path, caplog):
    import mlflow

    uri = registry["uri"]
    reg = register(tiny_mae(5), tracking_uri=uri, model_name="old-style", alias="current", run_id=None, tags={})
    mlflow.MlflowClient(uri).delete_model_version_tag(reg.name, str(reg.version), "files_sha256")
    with caplog.at_level("WARNING", logger="mae_service.tracking.registry"):
        assert load_encoder(reg.alias_uri, tracking_uri=uri) is not None
    assert "registered before every file got a checksum" in caplog.text
    rc, out, err = cli("models", "download", reg.alias_uri, str(tmp_path / "dl"), "--tracking-uri", uri)
    assert rc == 0 and "the weights and architecture.json verified" in out, err
    # … and its weights are still checked
    weights = _store_folder(uri, reg) / "artifacts" / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ValueError, match="encoder.safetensors.*refusing"):
        load_encoder(reg.alias_uri, tracking_uri=uri)


def test_a_version_that_is_not_an_mae_encoder_is_refused(registry, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(registry["uri"])
    client.create_registered_model("not-ours")
    folder = tmp_path / "some-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"123")
    mv = client.create_model_version("not-ours", source=str(folder))
    client.set_registered_model_alias("not-ours", "prod", mv.version)
    with pytest.raises(ValueError, match=r"models:/not-ours@prod.*not an mae-service encoder.*tiny-encoder"):
        load_encoder("models:/not-ours@prod", tracking_uri=registry["uri"])
    with pytest.raises(ValueError, match="not an mae-service encoder"):
        promote("not-ours", 1, "best", tracking_uri=registry["uri"])
    names = {r["name"] for r in list_versions(tracking_uri=registry["uri"])}
    assert "not-ours" not in names
    assert "not-ours" in {r["name"] for r in list_versions(tracking_uri=registry["uri"], include_all=True)}


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["models", "show", "models:/no-such-model@current"], f"no registered model 'no-such-model'.*{NAME}"),
        (["models", "show", f"models:/{NAME}@nope"], "has no alias 'nope'.*@current → "),
        (["models", "show", f"models:/{NAME}/99"], "has no version 99.*versions: 1"),
        (["models", "show", "runs:/abc/model"], "not of the form models:/NAME@ALIAS"),
        (["models", "show", f"models:/{NAME}"], "not of the form"),
        (["models", "download", f"models:/{NAME}/0", "out"], "positive integer"),
        (["models", "promote", NAME, "1", "--alias", "latest"], "reserved"),
        (["models", "promote", NAME, "x", "--alias", "best"], "positive integer"),
        (["models", "list", "--name", "ghost"], "no registered model 'ghost'"),
        (["eval", "knn", "--model", "models:/ghost@x", "--train-data", "a", "--val-data", "b"], "ghost"),
        (["reconstruct", "--model", f"models:/{NAME}@nope", "--data", "d", "--out", "x.png"], "no alias"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(registry, cli, argv, expect):
    import re

    rc, out, err = cli(*argv, "--tracking-uri", registry["uri"])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(expect, lines[0]), err


def test_cli_missing_or_unreachable_registry_fails_fast(tmp_path, cli):
    rc, _, err = cli("models", "list", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert rc == 2 and "does not exist" in err and not (tmp_path / "none.db").exists()
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_service",
            "models",
            "show",
            "models:/x@y",
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and str(port) in lines[0]
