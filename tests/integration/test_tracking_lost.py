"""The MLflow server lost mid-run (issue 13, fault 2 and defect 1): training never waits on tracking.

Each test starts its own ``mlflow server`` (SQLite store, artifacts on the S3 server) and faults it on a
condition: once the run's first checkpoint exists.

- killed for good: the run trains all its steps and writes every checkpoint, keeps what MLflow did not get in
  ``mlflow_spool.jsonl`` beside the checkpoints (on ``s3://``), and exits 2 naming the tracking URI; the server
  restarted on the same port and store, the same command replays the spool, registers, and closes the run FINISHED
  with every ``loss`` step and every picture;
- hung (SIGSTOP) for at least 25 s, during which training passes two more checkpoints, then SIGCONT: the run
  finishes with every ``loss`` step, FINISHED, no spool left.
Without Ray: rank 0's logger never blocks the caller while the server hangs, and delivers it all afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid

import mlflow
import pytest

from mae_service.data.synth import synthesize
from mae_service.train.spool import Spool
from tests.servers import MlflowServer
from tests.tiny import TINY_LOCAL

STEPS = 20  # 40 train images / batch 8 = 5 steps per epoch × 4 epochs
RESUBMIT = "resubmit the same command to finish the MLflow record"


@pytest.fixture
def own_mlflow(tmp_path, s3_server):
    """An MLflow server of this test alone (it gets killed or paused)."""
    workdir = tmp_path / "mlflow"
    workdir.mkdir()
    server = MlflowServer(workdir, s3_server, bucket=f"mlf-{uuid.uuid4().hex[:10]}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), num_images=50, image_size=32, classes=2, fmt="files", seed=3, val_fraction=0.2)
    return out


def _overrides(data, storage, server, experiment, run_name, model_name):
    return [
        *TINY_LOCAL,
        f"data.train_uri={data / 'train'}",
        f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        "train.epochs=4",
        "train.checkpoint_every_steps=4",
        "train.picture_every_steps=4",
        "train.keep_checkpoints=10",
        f"mlflow.tracking_uri={server.uri}",
        f"mlflow.experiment={experiment}",
        "mlflow.log_system_metrics=false",
        f"registry.model_name={model_name}",
    ]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen after {timeout:.0f} s")
        time.sleep(0.2)


def _run(uri, experiment, run_name):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mae.run_name` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_server_killed_for_good_then_resubmit_finishes_the_record(
    ray_local, s3_server, s3_bucket, own_mlflow, small_data, experiment_name, cli
):
    storage, name, model = f"s3://{s3_bucket}/ckpt", "lost", f"lost-{uuid.uuid4().hex[:8]}"
    args = _overrides(small_data, storage, own_mlflow, experiment_name, name, model)
    s3 = s3_server.client()

    def exists(key):
        return s3.list_objects_v2(Bucket=s3_bucket, Prefix=key).get("KeyCount", 0) > 0

    killed = threading.Event()

    def kill_after_first_checkpoint():
        _wait_for(lambda: exists(f"ckpt/{name}/step_00000004/meta.json"), 400, "the first checkpoint")
        own_mlflow.kill()
        killed.set()

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    t0 = time.monotonic()
    rc, out, err = cli("pretrain", *args)
    first_s = time.monotonic() - t0
    killer.join(30)
    assert killed.is_set(), (rc, err[-2000:])
    assert rc == 2, err[-3000:]
    message = [line for line in err.splitlines() if RESUBMIT in line]
    assert len(message) == 1 and own_mlflow.uri in message[0], err[-3000:]
    for step in range(4, STEPS + 1, 4):  # every checkpoint written while the server was gone
        assert exists(f"ckpt/{name}/step_{step:08d}/meta.json"), step
    assert exists(f"ckpt/{name}/mlflow_spool.jsonl")
    before = mlflow.MlflowClient(f"sqlite:///{own_mlflow.db_path}")  # the dead server's store, read directly
    _, dead_run = _run(f"sqlite:///{own_mlflow.db_path}", experiment_name, name)
    logged_before = len(before.get_metric_history(dead_run.info.run_id, "loss"))
    assert dead_run.info.status == "RUNNING" and logged_before < STEPS
    spooled = len(Spool(storage, name).read())

    own_mlflow.start()  # same port, same SQLite store, same S3 artifact root
    rc, out, err = cli("pretrain", *args)
    assert rc == 0, err[-3000:]
    client, run = _run(own_mlflow.uri, experiment_name, name)
    assert run.info.status == "FINISHED"
    loss = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(loss) == list(range(1, STEPS + 1)), sorted(loss)
    lr = {m.step for m in client.get_metric_history(run.info.run_id, "lr")}
    assert sorted(lr) == list(range(1, STEPS + 1))
    pictures = {f.path for f in client.list_artifacts(run.info.run_id, "reconstructions")}
    assert pictures == {f"reconstructions/step_{s:08d}.png" for s in range(4, STEPS + 1, 4)}, pictures
    assert run.data.tags["mae.checkpoint_uri"] == f"{storage}/{name}/step_{STEPS:08d}"
    mv = client.get_model_version_by_alias(model, "current")
    assert mv.run_id == run.info.run_id and mv.tags["steps"] == str(STEPS)
    assert not exists(f"ckpt/{name}/mlflow_spool.jsonl")  # replayed, then deleted
    print(f"FIGURES killed: first submission {first_s:.0f} s, exit 2; loss steps in MLflow before the resubmit "
          f"{logged_before}/{STEPS}, after {len(loss)}/{STEPS}; {spooled} records spooled")  # fmt: skip


def test_server_hung_mid_run_gets_every_metric_after_sigcont(
    ray_local, s3_server, own_mlflow, small_data, experiment_name, tmp_path, cli
):
    storage, name, model = tmp_path / "ck", "hung", f"hung-{uuid.uuid4().hex[:8]}"
    args = _overrides(small_data, storage, own_mlflow, experiment_name, name, model)
    seen: dict[str, float] = {}

    def pause_after_first_checkpoint():
        _wait_for(lambda: (storage / name / "step_00000004" / "meta.json").exists(), 400, "the first checkpoint")
        own_mlflow.pause()
        seen["paused"] = time.monotonic()
        try:  # hung until training has passed two more checkpoints, and for at least 25 s
            _wait_for(lambda: (storage / name / "step_00000012" / "meta.json").exists(), 300, "step 12 (paused)")
            seen["step12_while_paused"] = time.monotonic()
            while time.monotonic() - seen["paused"] < 25:
                time.sleep(0.5)
        finally:
            own_mlflow.resume()
            seen["resumed"] = time.monotonic()

    pauser = threading.Thread(target=pause_after_first_checkpoint, daemon=True)
    pauser.start()
    t0 = time.monotonic()
    rc, out, err = cli("pretrain", *args)
    run_s = time.monotonic() - t0
    pauser.join(60)
    assert "step12_while_paused" in seen, (seen, err[-3000:])  # training went on while the server hung
    assert rc == 0, err[-3000:]
    client, run = _run(own_mlflow.uri, experiment_name, name)
    assert run.info.status == "FINISHED"
    loss = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(loss) == list(range(1, STEPS + 1)), sorted(loss)
    pictures = {f.path for f in client.list_artifacts(run.info.run_id, "reconstructions")}
    assert pictures == {f"reconstructions/step_{s:08d}.png" for s in range(4, STEPS + 1, 4)}, pictures
    assert not (storage / name / "mlflow_spool.jsonl").exists()
    assert client.get_model_version_by_alias(model, "current").run_id == run.info.run_id
    print(f"FIGURES hung: paused {seen['resumed'] - seen['paused']:.0f} s, step 12 checkpointed "
          f"{seen['step12_while_paused'] - seen['paused']:.0f} s into the pause; run {run_s:.0f} s, exit {rc}; "
          f"loss steps in MLflow {len(loss)}/{STEPS}")  # fmt: skip


def test_run_logger_never_blocks_on_a_hung_server(own_mlflow, tmp_path):
    """Rank 0's logger alone: 200 steps of metrics, a picture and a tag logged while the server is SIGSTOPped all
    return (a watchdog would resume the server after 120 s and fail the test), the checkpoint flush spools them,
    and after SIGCONT the close delivers every one and deletes the spool."""
    import torch

    from mae_service.model import create_model
    from mae_service.train.run_logger import RunLogger

    client = mlflow.MlflowClient(own_mlflow.uri)
    run_id = client.create_run(client.create_experiment(f"logger-{uuid.uuid4().hex[:8]}")).info.run_id
    spool = Spool(str(tmp_path / "ck"), "r")
    logger = RunLogger(own_mlflow.uri, run_id, system_metrics=True, spool=spool, flush_timeout=5)
    logger.metrics({"loss": 1.0}, 1)
    assert logger.flush() == 0  # delivered while the server answers
    own_mlflow.pause()
    watchdog = threading.Timer(120, own_mlflow.resume)
    watchdog.start()
    try:
        model = create_model(
            "mae_vit_tiny_patch16",
            img_size=32,
            patch_size=8,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=4,
        )
        for step in range(2, 201):
            logger.metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
        logger.picture(model, torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), 200, seed=0)
        logger.tag("mae.test", "hung")
        held = logger.flush()  # bounded: returns while the server still hangs
        assert watchdog.is_alive(), "logging blocked until the watchdog resumed the server"
        assert held >= 201 and len(spool.read()) == held  # 199 metric batches, the picture, the tag
        logger.flush_timeout = 600  # the next checkpoint's flush: the same request still hangs, so no wait at all
        assert logger.flush() == held
        assert watchdog.is_alive(), "the second flush waited on the request the first one gave up on"
    finally:
        watchdog.cancel()
        own_mlflow.resume()
    logger.flush_timeout = 120  # generous: what was held goes out now that the server answers
    assert logger.close() == 0
    assert not (tmp_path / "ck" / "r" / "mlflow_spool.jsonl").exists()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 201))
    run = client.get_run(run_id)
    assert run.data.tags["mae.test"] == "hung"
    assert any(k.startswith("system/") for k in run.data.metrics)  # the last sample, taken at close
    assert [f.path for f in client.list_artifacts(run_id, "reconstructions")] == ["reconstructions/step_00000200.png"]


def test_finetune_with_the_server_killed_for_good_is_finished_by_the_resubmit(
    ray_local, own_mlflow, small_data, experiment_name, tmp_path, cli
):
    """Fine-tuning keeps the same promise as pretraining: the server killed after the first checkpoint, every epoch
    is still trained and checkpointed, the run exits 2 naming the tracking URI with what MLflow missed in the spool;
    the resubmit on the restarted server replays it, registers the classifier and closes the run FINISHED with every
    ``loss`` step once."""
    import torch

    from mae_service.model import create_model
    from mae_service.tracking import register_encoder

    torch.manual_seed(0)
    encoder = create_model(
        "mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
    ).eval()  # fmt: skip
    name = f"ftlost-{uuid.uuid4().hex[:8]}"
    register_encoder(encoder, tracking_uri=own_mlflow.uri, model_name=name, alias="current", run_id=None, tags={})
    storage, run_name, steps = tmp_path / "ck", "ft-lost", 20  # 40 images / batch 8 = 5 steps × 4 epochs
    args = [
        "eval", "finetune", "--model", f"models:/{name}@current", "--train-data", str(small_data / "train"),
        "--val-data", str(small_data / "val"), "--tracking-uri", own_mlflow.uri,
        f"train.storage_path={storage}", "train.num_workers=1", "finetune.batch_size=8", "finetune.epochs=4",
        "finetune.warmup_epochs=1", f"finetune.run_name={run_name}", f"mlflow.experiment={experiment_name}",
        "train.keep_checkpoints=10",
    ]  # fmt: skip
    killed = threading.Event()

    def kill_after_first_checkpoint():
        _wait_for(lambda: (storage / run_name / "step_00000005" / "meta.json").exists(), 400, "the first checkpoint")
        own_mlflow.kill()
        killed.set()

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    rc, out, err = cli(*args)
    killer.join(30)
    assert killed.is_set(), (rc, err[-2000:])
    assert rc == 2, err[-3000:]
    message = [line for line in err.splitlines() if RESUBMIT in line]
    assert len(message) == 1 and own_mlflow.uri in message[0], err[-3000:]
    for step in range(5, steps + 1, 5):  # every epoch's checkpoint written while the server was gone
        assert (storage / run_name / f"step_{step:08d}" / "meta.json").exists(), step
    assert (storage / run_name / "mlflow_spool.jsonl").exists()

    own_mlflow.start()
    rc, out, err = cli(*args)
    assert rc == 0, err[-3000:]
    client, run = _run(own_mlflow.uri, experiment_name, run_name)
    assert run.info.status == "FINISHED"
    loss = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(loss) == list(range(1, steps + 1)), sorted(loss)
    val = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert sorted(val) == [0, 5, 10, 15, 20], sorted(val)
    assert client.get_model_version_by_alias(f"{name}-ft", "current").run_id == run.info.run_id
    assert not (storage / run_name / "mlflow_spool.jsonl").exists()
