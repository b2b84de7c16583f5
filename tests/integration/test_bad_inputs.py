"""Bad inputs, through the CLI as a user runs it (``python -m mae_service …`` in a subprocess): each case must exit
2 with one message naming the bad value and what is allowed, fail before any Ray starts, and leave what is
already written (a run's checkpoints, the registry's artifacts, an existing output file) byte-identical.

Whether Ray started is read off ``RAY_TMPDIR`` (Ray puts its session folder there) and the output. Some odd
images must *not* be refused: CMYK, 16-bit, palette and RGBA images decode to RGB (tested here on a dataset,
per mode; the per-mode conversion itself is ``tests/unit/test_decode.py``).

``MAE_BAD_INPUT_TIMES=FILE`` writes each case's exit code, message and time to fail (seconds, wall clock of the
subprocess, imports included) to FILE as JSON: ``tests/FAULTS.md``'s table comes from one such run. Cases tested
elsewhere are listed in that table too and not repeated here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.servers import QUIET_ENV, S3Server, free_port
from tests.tiny import TINY_MODEL
from tests.unit.test_decode import encode, gradient, png_bomb

NAME = "bad-inputs-enc"
RUN = "existing-run"
_TIMES: dict[str, dict] = {}


# ---- the world the cases run against ------------------------------------------------------------------------
def _synth(out: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "mae_service", "data", "synth", str(out), "--num-images", "16", "--image-size", "32",
         "--classes", "2", *extra],
        check=True,
        capture_output=True,
        env={**os.environ, **QUIET_ENV},
    )  # fmt: skip


def _images(folder: Path, blobs: dict[str, bytes]) -> Path:
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for name, data in blobs.items():
            (folder / cls / name).write_bytes(data)
    return folder


def _state_digest(root: Path) -> dict[str, str]:
    """sha256 of every file a case must not touch (checkpoints, registry artifacts, an existing picture)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".db"  # the SQLite store may be opened (read) by a case
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    data, state = root / "data", root / "state"
    _synth(data / "good")
    _synth(data / "wds", "--format", "wds")
    _synth(data / "pq", "--format", "parquet")
    # a run that already has a checkpoint, and a picture already written: both must stay as they are
    ck = state / "ck" / RUN / "step_00000010"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"step": 10}))
    (ck / "model.safetensors").write_bytes(os.urandom(4096))
    (state / "recon.png").write_bytes(encode(gradient(8, 8)))
    # the registry: one tiny encoder in a SQLite store, artifacts beside it
    import torch

    from mae_service.model import create_model
    from mae_service.tracking import register_encoder

    cwd = os.getcwd()
    os.chdir(state)
    try:
        torch.manual_seed(0)
        mae = create_model(
            "mae_vit_tiny_patch16", img_size=32, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4
        )
        register_encoder(
            mae, tracking_uri=f"sqlite:///{state / 'mlflow.db'}", model_name=NAME, alias="current", run_id=None,
            tags={},
        )  # fmt: skip
    finally:
        os.chdir(cwd)

    # bad datasets
    jpeg = encode(gradient(64, 64), "JPEG", quality=90)
    _images(data / "zero", {f"{i}.jpg": b"" for i in range(4)})
    _images(data / "truncated", {f"{i}.jpg": jpeg[: len(jpeg) // 2] for i in range(4)})
    _images(data / "bomb", {f"{i}.png": png_bomb() for i in range(4)})
    _images(data / "fake-jpg", {f"{i}.jpg": b"<html>not an image</html>\n" for i in range(4)})
    _images(data / "text", {f"{i}.txt": b"hello\n" for i in range(4)})
    (data / "empty").mkdir()
    unlabelled = data / "unlabelled"
    unlabelled.mkdir()
    for i, f in enumerate(sorted((data / "good").rglob("*.jpg"))):
        shutil.copy(f, unlabelled / f"{i:03d}.jpg")
    # a truncated wds shard whose _index.json still counts it (so no listing pass reads it)
    shards = sorted((data / "wds").rglob("*.tar"))
    assert shards and any(p.name == "_index.json" for p in (data / "wds").rglob("*"))
    blob = shards[-1].read_bytes()
    shards[-1].write_bytes(blob[: len(blob) // 2 + 100])
    # Parquet without an image column
    import pyarrow as pa
    import pyarrow.parquet as pq

    (data / "pq-noimg").mkdir()
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "label": [0, 1]}), data / "pq-noimg" / "part-0.parquet")
    # odd modes that must decode
    odd = {
        "cmyk.jpg": encode(gradient(40, 30).convert("CMYK"), "JPEG"),
        "grey16.png": encode(Image.fromarray(np.full((30, 40), 40000, np.uint16))),
        "palette.png": encode(gradient(40, 30).quantize(16)),
        "rgba.png": encode(gradient(40, 30).convert("RGBA")),
    }
    for mode, blob in odd.items():
        _images(data / f"odd-{mode.split('.')[0]}", {f"{i}-{mode}": blob for i in range(8)})
    (root / "a-file").write_text("not a folder\n")
    (root / "broken.yaml").write_text("train:\n  epochs: [1, 2\n")

    before = _state_digest(state)
    yield {"root": root, "data": data, "state": state, "db": f"sqlite:///{state / 'mlflow.db'}"}
    assert _state_digest(state) == before  # and after every case (checked there too)
    if out := os.environ.get("MAE_BAD_INPUT_TIMES"):
        Path(out).write_text(json.dumps(_TIMES, indent=2, sort_keys=True) + "\n")


def _pretrain_args(w: dict, *overrides: str) -> list[str]:
    return [
        "pretrain",
        *TINY_MODEL,
        "train.batch_size=8",
        "train.num_workers=1",
        f"data.train_uri={w['data'] / 'good'}",
        f"train.storage_path={w['state'] / 'ck'}",
        f"train.run_name={RUN}",
        f"mlflow.tracking_uri={w['db']}",
        "registry.register=false",
        *overrides,
    ]


def _run(case: str, w: dict, argv: list[str], env: dict | None = None, cwd: Path | None = None):
    """Run the CLI; returns (rc, stdout, stderr) after asserting Ray never started and nothing was damaged."""
    raytmp = w["root"] / f"ray-{case}"
    before = _state_digest(w["state"])
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mae_service", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd or w["root"],
        env={**os.environ, **QUIET_ENV, "RAY_TMPDIR": str(raytmp), **(env or {})},
    )
    seconds = time.monotonic() - t0
    err = proc.stderr.strip().splitlines()
    _TIMES[case] = {"rc": proc.returncode, "seconds": round(seconds, 2), "message": err[-1] if err else ""}
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not raytmp.exists(), f"{case}: Ray started ({sorted(p.name for p in raytmp.iterdir())})"
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert _state_digest(w["state"]) == before, f"{case}: something already written changed"
    return proc.returncode, proc.stdout, proc.stderr


# ---- the cases: (id, argv builder, what the message must say) -------------------------------------------------
def _case(id_: str, argv, *expect: str, env=None):
    return pytest.param(argv, expect, env, id=id_)


CASES = [
    # config: types, values, unknown keys (build_config's messages are unit-tested; here: the CLI's exit and output)
    _case("cfg-type", lambda w: _pretrain_args(w, "train.epochs=two"), r"train\.epochs='two': expected an integer"),
    _case("cfg-value", lambda w: _pretrain_args(w, "model.mask_ratio=1.5"), r"model\.mask_ratio=1\.5: must be in \(0, 1\)"),
    _case("cfg-unknown-key", lambda w: _pretrain_args(w, "train.epoch=3"), r"unknown key train\.epoch; allowed: .*epochs"),
    _case("cfg-unknown-section", lambda w: _pretrain_args(w, "trian.epochs=3"), r"unknown section 'trian'; allowed: data, model, train"),
    _case("cfg-not-a-mapping", lambda w: ["pretrain", "--config", str(w["root"] / "a-file")], r"config file must be a mapping of sections"),
    _case("cfg-invalid-yaml", lambda w: ["pretrain", "--config", str(w["root"] / "broken.yaml")], r"config file '.*broken\.yaml' is not valid YAML"),
    _case("lr-nan", lambda w: _pretrain_args(w, "train.lr=nan"), r"train\.lr=nan: must be positive"),
    _case("warmup-nan", lambda w: _pretrain_args(w, "train.warmup_epochs=nan"), r"train\.warmup_epochs=nan: must be ≥ 0"),
    _case("alias-dot", lambda w: _pretrain_args(w, "registry.alias=my.alias"), r"registry\.alias='my\.alias': an alias is 1–255 letters, digits, '_' or '-'"),
    _case("model-name-slash", lambda w: _pretrain_args(w, "registry.model_name=team/enc"), r"registry\.model_name='team/enc': .*no '/'"),
    _case("run-name-quote", lambda w: _pretrain_args(w, "train.run_name=it's"), r"train\.run_name=\"it's\": must be a plain name.*letters, digits"),
    _case("train-uri-null", lambda w: _pretrain_args(w, "data.train_uri=null"), r"data\.train_uri=null: expected a string \(this key cannot be null\)"),
    _case("postgresql-uri", lambda w: _pretrain_args(w, "mlflow.tracking_uri=postgresql://u:pw@127.0.0.1:5/db"),
          r"mlflow\.tracking_uri='postgresql://127\.0\.0\.1:5/db': the postgresql driver needs the Python package 'psycopg"),
    _case("storage-under-a-file", lambda w: _pretrain_args(w, f"train.storage_path={w['root'] / 'a-file' / 'ck'}"),
          r"train\.storage_path=.*a-file.*is a file, not a folder; give a writable folder"),
    _case("storage-read-only", lambda w: _pretrain_args(w, "train.storage_path=/proc/mae-checkpoints"),
          r"train\.storage_path='/proc/mae-checkpoints': cannot write in '/proc'"),
    # data
    _case("prefix-missing", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'nope'}"), r"data source '.*nope': nothing found at this location"),
    _case("prefix-empty", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'empty'}"), r"'.*empty': no images found \(format 'files' looks for \.jpg"),
    _case("prefix-non-images", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'text'}"), r"'.*text': no images found \(format 'files' looks for \.jpg"),
    _case("images-not-images", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'fake-jpg'}"),
          r"data\.train_uri='.*fake-jpg': none of the first 8 images decodes \(e\.g\. .*0\.jpg: not a readable image.*give a folder of JPEG/PNG"),
    _case("images-zero-byte", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'zero'}"), r"'.*zero': none of the first 8 images decodes \(e\.g\. .*0\.jpg: zero-byte object"),
    _case("images-truncated", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'truncated'}"), r"'.*truncated': none of the first 8 images decodes \(e\.g\. .*0\.jpg: .*[Tt]runcated"),
    _case("images-bomb", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'bomb'}"),
          r"'.*bomb': none of the first 8 images decodes \(e\.g\. .*0\.png: decompression bomb: over the limit of 64000000 pixels"),
    _case("wds-truncated-shard", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'wds'}", "data.format=wds"),
          r"tar shard .*\.tar is truncated \(\d+ bytes, not a whole number of 512-byte tar blocks\)"),
    _case("parquet-no-image-column", lambda w: _pretrain_args(w, f"data.train_uri={w['data'] / 'pq-noimg'}", "data.format=parquet"),
          r"no image-bytes column in .*part-0\.parquet.*looked for a binary column named one of .*columns are path, label"),
    # registry, eval, reconstruct
    _case("promote-bad-alias", lambda w: ["models", "promote", NAME, "1", "--alias", "my.alias", "--tracking-uri", w["db"]],
          r"alias 'my\.alias': an alias is 1–255 letters, digits, '_' or '-'"),
    _case("eval-runs-uri", lambda w: ["eval", "knn", "--model", "runs:/0123abcd/model", "--train-data", str(w["data"] / "good"), "--val-data", str(w["data"] / "good"), "--tracking-uri", w["db"]],
          r"model URI 'runs:/0123abcd/model' is not of the form models:/NAME@ALIAS or models:/NAME/VERSION"),
    _case("reconstruct-no-version", lambda w: ["reconstruct", "--model", f"models:/{NAME}/999", "--data", str(w["data"] / "good"), "--out", str(w["root"] / "r.png"), "--tracking-uri", w["db"]],
          rf"model '{NAME}' has no version 999 .*versions: 1"),
    _case("eval-unlabelled", lambda w: ["eval", "knn", "--model", f"models:/{NAME}@current", "--train-data", str(w["data"] / "unlabelled"), "--val-data", str(w["data"] / "good"), "--tracking-uri", w["db"], "--no-record"],
          r"'.*unlabelled' has \d+ images and no labels: the evaluation needs labelled images — class folders"),
    _case("reconstruct-out-read-only", lambda w: ["reconstruct", "--model", f"models:/{NAME}@current", "--data", str(w["data"] / "good"), "--out", "/proc/recon.png", "--tracking-uri", w["db"]],
          r"--out '/proc/recon\.png': cannot write in '/proc' .*give a \.png in a writable folder"),
    _case("reconstruct-out-under-a-file", lambda w: ["reconstruct", "--model", f"models:/{NAME}@current", "--data", str(w["data"] / "good"), "--out", str(w["root"] / "a-file" / "r.png"), "--tracking-uri", w["db"]],
          r"--out '.*a-file/r\.png': folder '.*a-file' does not exist; give a \.png in a writable folder"),
    _case("download-out-under-a-file", lambda w: ["models", "download", f"models:/{NAME}@current", str(w["root"] / "a-file" / "out"), "--tracking-uri", w["db"]],
          r"output folder '.*a-file/out': cannot write in '.*a-file'; give a writable folder"),
    _case("download-out-not-empty", lambda w: ["models", "download", f"models:/{NAME}@current", str(w["state"] / "ck"), "--tracking-uri", w["db"]],
          r"output folder '.*ck' is not empty; give a new or empty folder"),
]  # fmt: skip


@pytest.mark.parametrize("argv, expect, env", CASES)
def test_bad_input_exits_2_naming_it_before_ray(world, request, argv, expect, env):
    case = request.node.callspec.id
    rc, out, err = _run(case, world, argv(world), env=env)
    assert rc == 2, (rc, err[-2000:])
    message = err
    for pattern in expect:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{err[-2000:]}"


def test_wrong_s3_credentials_name_the_uri_and_the_fix(world, tmp_path):
    """A server that checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT=0``): ours are unknown to it."""
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        strict = S3Server(tmp_path)
    finally:
        del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        uri = "s3://some-bucket/images"
        env = {
            "AWS_ENDPOINT_URL": strict.endpoint,
            "AWS_ACCESS_KEY_ID": "wrong-id",
            "AWS_SECRET_ACCESS_KEY": "wrong-sk",
        }
        rc, _, err = _run("s3-wrong-credentials", world, _pretrain_args(world, f"data.train_uri={uri}"), env=env)
        assert rc == 2 and uri in err and re.search(r"credentials", err, re.IGNORECASE), err
        assert "wrong-sk" not in err
    finally:
        strict.stop()


def test_unreachable_tracking_server_for_a_run(world):
    port = free_port()
    rc, _, err = _run(
        "tracking-unreachable", world, _pretrain_args(world, f"mlflow.tracking_uri=http://127.0.0.1:{port}")
    )
    assert rc == 2 and re.search(rf"MLflow tracking server http://127\.0\.0\.1:{port} is unreachable.*start it", err)


@pytest.mark.parametrize("mode", ["cmyk", "grey16", "palette", "rgba"])
def test_odd_image_modes_are_converted_not_refused(world, mode):
    """CMYK, 16-bit grey, palette and RGBA datasets pass the preflight's decode probe and crop to uint8 RGB."""
    from mae_service.config import build_config
    from mae_service.data.decode import random_resized_crop
    from mae_service.data.source import probe_images
    from mae_service.train.preflight import preflight

    folder = world["data"] / f"odd-{mode}"
    cfg = build_config(
        {},
        _pretrain_args(world, f"data.train_uri={folder}", f"train.storage_path={world['root'] / f'ck-{mode}'}")[1:],
    )
    inputs = preflight(cfg)
    assert inputs.train.num_images == 16 and inputs.plan.steps_per_epoch == 2
    assert probe_images(inputs.train, 8) == (8, [])
    for f in sorted(folder.rglob("*.*")):
        x = random_resized_crop(f.read_bytes(), 32, np.random.default_rng(0))
        assert x.dtype == np.uint8 and x.shape == (3, 32, 32)
        if mode == "rgba":  # the transparent-free RGBA gradient keeps its colours
            assert x.std() > 10


def test_truncated_wds_shard_without_index_names_the_shard(world, tmp_path):
    """Without ``_index.json`` the listing reads the tars: a cut one is named there too."""
    src = tmp_path / "wds"
    shutil.copytree(world["data"] / "wds", src)
    for p in src.rglob("_index.json"):
        p.unlink()
    cut = sorted(src.rglob("*.tar"))[-1]
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as t:  # a whole number of blocks, but cut mid-member
        info = tarfile.TarInfo("x.jpg")
        info.size = 4096
        t.addfile(info, io.BytesIO(b"\0" * 4096))
    cut.write_bytes(tar_bytes.getvalue()[:1536])
    rc, _, err = _run(
        "wds-truncated-no-index", world, _pretrain_args(world, f"data.train_uri={src}", "data.format=wds")
    )
    assert rc == 2 and cut.name in err, err
