"""Checkpoint storage that fills up or turns read-only mid-run (issue 13, fault 4), on a real filesystem.

``train.storage_path`` is a small tmpfs mounted by the test (root ignores mode bits, so a real filesystem is what
refuses the writes; skipped where ``mount`` is not permitted). ``python -m mae_service pretrain`` runs as a
subprocess (its own local Ray). Once the first checkpoint is complete, the filesystem is

- filled up (a file written until ``ENOSPC``), or
- remounted read-only (``EROFS``).

Then: exit 2 with one line naming ``train.storage_path`` (not an Errno traceback), the checkpoints written before
intact (their files' sha256 match ``meta.json``, the weights load), :func:`latest_checkpoint` gives the last complete
one and passes over any half-written folder, and (full disk) once space is freed the same command continues from it
to the last step.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
import uuid

import pytest

from mae_service.data.synth import synthesize
from mae_service.train.checkpoint import STEP_DIR, latest_checkpoint, load_model_weights, read_meta
from tests.ray_procs import ROOT, env_without_loopback_hint, stop_driver
from tests.tiny import TINY_LOCAL

STEPS = 16  # 32 train images / batch 8 = 4 steps per epoch × 4 epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), num_images=40, image_size=32, classes=2, fmt="files", seed=13, val_fraction=0.2)
    return out / "train"


@pytest.fixture
def small_fs(tmp_path):
    """A 400 MiB tmpfs of this test alone (room for a few checkpoints of the tiny model), unmounted at the end."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mnt)], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): a real filesystem is needed to fill up")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(mnt) -> int:
    """Write a file until the filesystem is full; returns its bytes."""
    written, chunk = 0, b"\0" * (1 << 20)
    with open(mnt / "filler", "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return written


def _read_only(mnt) -> int:
    """Remount read-only (EBUSY while a file is open for writing: try again); returns 0."""
    for _ in range(200):
        done = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return 0
        time.sleep(0.05)
    raise AssertionError(f"could not remount {mnt} read-only: {done.stderr}")


def _command(data, storage, tracking_uri, run_name):
    return [
        sys.executable,
        "-m",
        "mae_service",
        "pretrain",
        *TINY_LOCAL,
        f"data.train_uri={data}",
        f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        "train.epochs=4",
        "train.seed=5",
        "train.checkpoint_every_steps=4",
        "train.picture_every_steps=100",
        "train.keep_checkpoints=10",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment=unwritable-{uuid.uuid4().hex[:8]}",
        "mlflow.log_system_metrics=false",
        "registry.register=false",
    ]


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_storage_unwritable_mid_run_fails_clearly_and_keeps_the_checkpoints(fault, small_fs, data, tmp_path):
    storage, run_name = small_fs / "ck", "r"
    run_dir = storage / run_name
    cmd = _command(data, storage, f"sqlite:///{tmp_path / 'mlflow.db'}", run_name)
    log_path = tmp_path / "run.log"
    log = log_path.open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env_without_loopback_hint(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        while latest_checkpoint(str(storage), run_name, None) is None:  # the first complete checkpoint
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() - t0 < 300, "no checkpoint after 300 s"
            time.sleep(0.2)
        faulted_s = time.monotonic() - t0
        filler = _fill(small_fs) if fault == "full" else _read_only(small_fs)
        before = {p.name for p in run_dir.iterdir() if STEP_DIR.match(p.name)}
        rc = proc.wait(300)
        fail_s = time.monotonic() - t0
    finally:
        stop_driver(proc, log)
    output = log_path.read_text()
    assert rc == 2, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("mae-service pretrain: error:")]
    assert len(errors) == 1, output[-4000:]
    assert f"train.storage_path={str(storage)!r}" in errors[0], errors[0]
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    assert reason in errors[0], errors[0]
    assert output.rstrip().splitlines()[-1] == errors[0]  # the last word, no traceback after it

    found = latest_checkpoint(str(storage), run_name, None)
    assert found is not None
    path, _, meta = found
    complete = sorted(
        int(p.name[5:]) for p in run_dir.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").exists()
    )
    assert meta.step < STEPS and meta.step in complete, (meta.step, complete)
    for step in complete:  # every checkpoint written before the fault: intact and loadable
        d = run_dir / f"step_{step:08d}"
        if step <= meta.step:
            assert read_meta(d).step == step
    from mae_service.model import create_model

    model = create_model(**meta.model_args)
    load_model_weights(path, model)
    halfway = sorted(
        p.name for p in run_dir.iterdir() if STEP_DIR.match(p.name) and int(p.name[5:]) > meta.step
    )  # what the refused write left: passed over by latest_checkpoint
    resumed = ""
    if fault == "full":  # space freed: the same command continues from the last complete checkpoint
        (small_fs / "filler").unlink()
        t1 = time.monotonic()
        again = subprocess.run(
            cmd, env=env_without_loopback_hint(), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
        assert f"continuing from step {meta.step}" in again.stderr, again.stderr[-3000:]
        last = latest_checkpoint(str(storage), run_name, None)
        assert last is not None and last[2].step == STEPS
        resumed = f"; after freeing space the resubmit continued from step {meta.step} to {STEPS} in {time.monotonic() - t1:.0f} s"
    print(
        f"FIGURES storage {fault}: fault {faulted_s:.0f} s after start (filler {filler >> 20} MiB; step folders then "
        f"{sorted(before)}), exit {rc} {fail_s - faulted_s:.0f} s later: {errors[0]}; latest complete step "
        f"{meta.step}, half-written folders passed over: {halfway}{resumed}"
    )
