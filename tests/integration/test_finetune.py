"""``mae-service eval finetune`` on a local Ray with a real MLflow server: a tiny registered encoder fine-tuned on a
labelled synthetic set ends above its start, is registered and reloads in a fresh process with equal logits;
``--blocks 1`` leaves the frozen parameters bit-identical; a fine-tune killed mid-run and resubmitted continues
from its checkpoint to the same final step; bad input fails before any Ray work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from mae_service.cli import main
from mae_service.config import build_config
from mae_service.data import synthesize
from mae_service.model import create_model
from mae_service.tracking import describe, load_classifier, load_encoder, register_encoder

REPO = Path(__file__).resolve().parents[2]
JSON_KEYS = {"top1", "top5", "blocks", "from_scratch", "model_uri", "classifier_uri", "mlflow_run_id", "epochs"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("ft")
    data = root / "data"
    synthesize(str(data), num_images=80, image_size=32, classes=3, val_fraction=0.25, seed=3)
    torch.manual_seed(0)
    model = create_model(
        "mae_vit_tiny_patch16",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=4,
    ).eval()
    reg = register_encoder(
        model, tracking_uri=mlflow_server.uri, model_name="ft-encoder", alias="current", run_id=None, tags={}
    )
    return {"root": root, "data": data, "uri": mlflow_server.uri, "reg": reg}


def _args(setup, *extra: str) -> list[str]:
    """Flags first, then every KEY=VALUE (argparse takes the overrides as one group)."""
    d = setup["data"]
    args = [
        "--model",
        "models:/ft-encoder@current",
        "--train-data",
        str(d / "train"),
        "--val-data",
        str(d / "val"),
        "--tracking-uri",
        setup["uri"],
        f"train.storage_path={setup['root'] / 'ck'}",
        "train.num_workers=2",
        "finetune.batch_size=20",
        "finetune.blr=5e-2",
        "finetune.warmup_epochs=1",
        "mlflow.experiment=ft-tests",
        *extra,
    ]
    return [a for a in args if "=" not in a or a.startswith("--")] + [
        a for a in args if "=" in a and not a.startswith("--")
    ]


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)}


def test_bad_input_fails_before_ray(setup, tmp_path, capsys):
    import ray

    d = setup["data"]
    (tmp_path / "flat").mkdir()
    for f in list((d / "val").rglob("*.*"))[:4]:
        (tmp_path / "flat" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "one" / "circle").mkdir(parents=True)
    for f in list((d / "val").rglob("*.*"))[:4]:
        (tmp_path / "one" / "circle" / f.name).write_bytes(f.read_bytes())
    cases = [
        (["--train-data", str(tmp_path / "flat")], "unlabelled"),
        (["--train-data", str(tmp_path / "one")], "one class only"),
        (["--val-data", str(tmp_path / "one")], "disagree on their classes"),
        (["--blocks", "3"], "between 0 and the encoder's depth 2"),
        (["--blocks=-1"], "finetune.blocks=-1: must be ≥ 0"),
        (["--model", "models:/nope@current"], "no registered model 'nope'"),
        (["--from-scratch", "--blocks", "1"], "from_scratch=true with finetune.blocks=1"),
        (["finetune.nope=1"], "unknown key finetune.nope"),
    ]
    for extra, message in cases:
        argv = ["eval", "finetune", *_args(setup, *extra)]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert not ray.is_initialized()


def test_finetune_cli_registers_a_classifier_that_reloads(setup, ray_local, tmp_path, capsys):
    out = tmp_path / "ft.json"
    plain = ["finetune.mixup=0", "finetune.cutmix=0", "finetune.run_name=full"]  # learns fastest in 18 steps
    rc = main(["eval", "finetune", *_args(setup, "--epochs", "6", "--json", str(out), *plain)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert set(res) == JSON_KEYS
    assert res["blocks"] is None and res["from_scratch"] is False and res["epochs"] == 6 and res["top5"] is None
    assert res["model_uri"] == "models:/ft-encoder/1" and res["classifier_uri"] == "models:/ft-encoder-ft/1"
    uri, run_id = setup["uri"], res["mlflow_run_id"]
    val = _history(uri, run_id, "val_top1")
    assert sorted(val) == [0, 3, 6, 9, 12, 15, 18]  # start, then each epoch (60 images / batch 20 → 3 steps)
    loss = _history(uri, run_id, "train_loss")  # per epoch; held-out top-1 of 20 images moves in steps of 0.05
    assert sorted(loss) == [3, 6, 9, 12, 15, 18] and loss[18] < loss[3], loss
    assert len(_history(uri, run_id, "loss")) == 18 and 0 <= val[18] <= 1
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.tags["mae_service.source_model_uri"] == "models:/ft-encoder/1"
    assert run.data.tags["mae_service.source_run"] == setup["reg"].run_id
    tags = describe("models:/ft-encoder/1", tracking_uri=uri)["tags"]
    assert float(tags["eval.finetune_top1"]) == pytest.approx(res["top1"], abs=1e-5)

    # the classifier reloads in a fresh process with the same logits
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    model = load_classifier(res["classifier_uri"], tracking_uri=uri)
    with torch.no_grad():
        here = model(x)
    code = (
        "import sys, torch; from mae_service.tracking import load_classifier; "
        f"m = load_classifier('{res['classifier_uri']}', tracking_uri='{uri}'); "
        f"x = torch.load('{tmp_path / 'x.pt'}', weights_only=True); "
        f"torch.save(m(x).detach(), '{tmp_path / 'y.pt'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), here)
    assert type(model).__name__ == "VisionTransformer" and here.shape == (4, 3)


def test_killed_partial_finetune_resumes_and_keeps_frozen_blocks(setup, ray_local, tmp_path):
    from mae_service.finetune import finetune

    cfg = build_config(
        {},
        [
            *[a for a in _args(setup) if "=" in a and not a.startswith("--")],
            "finetune.model_uri=models:/ft-encoder@current",
            f"data.train_uri={setup['data'] / 'train'}",
            f"data.val_uri={setup['data'] / 'val'}",
            f"mlflow.tracking_uri={setup['uri']}",
            "finetune.blocks=1",
            "finetune.epochs=8",
            "finetune.run_name=killed",
            "train.max_failures=0",
            "finetune.register=true",
            "finetune.model_name=ft-partial",
        ],
    )
    out: dict = {}

    def run():
        try:
            out["result"] = finetune(cfg)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    first = setup["root"] / "ck" / "killed" / "step_00000003" / "meta.json"
    deadline = time.monotonic() + 300
    while not first.exists() and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), out
    for p in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
            p.kill()
    th.join(300)
    assert "error" in out, "the killed fine-tune should have failed"
    res = finetune(cfg)  # resubmitted: continues from its last checkpoint
    assert res.step == 24 and res.blocks == 1
    steps = _history(setup["uri"], res.mlflow_run_id, "loss")
    assert max(steps) == 24 and min(steps) == 1
    # frozen: patch/pos embeddings, cls token and block 0 are bit-identical to the source encoder; the rest moved
    enc = load_encoder("models:/ft-encoder/1", tracking_uri=setup["uri"]).state_dict()
    clf = load_classifier(res.classifier_uri, tracking_uri=setup["uri"]).state_dict()
    for k, v in enc.items():
        name = "fc_norm." + k[5:] if k.startswith("norm.") else k
        if k.startswith("blocks.1.") or k.startswith("norm."):
            assert not torch.equal(clf[name], v), k
        else:
            assert torch.equal(clf[name], v), k
