"""The local Ray a run starts without a cluster (issue 13): every socket on loopback, one instance per machine (a
second run refuses clearly, exit 2, and the first keeps working), and a SIGKILLed driver's leftovers are stopped by
the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from mae_service.local_ray import processes_under, reap_leftovers
from tests.ray_procs import ROOT, HeldRay, descendants, env_without_loopback_hint, is_loopback, listening
from tests.tiny import TINY_MODEL


@pytest.fixture
def held_ray():
    held: list[HeldRay] = []

    def start() -> HeldRay:
        h = HeldRay()
        held.append(h)
        return h

    yield start
    for h in held:
        h.stop()


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.3") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_every_socket_of_the_local_ray_is_on_loopback(held_ray):
    ray = held_ray()
    pids = [ray.pid, *descendants(ray.pid)]
    socks = listening(pids)
    names = {name for _, name, _, _ in socks}
    # the GCS, the raylet, the dashboard agent, the runtime-env agent, the dashboard and the workers all listen
    assert {"gcs_server", "raylet"} <= names, socks
    assert len(socks) >= 10, socks
    assert any(port == 8265 for *_, port in socks), "the dashboard (on: Ray Train's cleanup needs it) is listening"
    wide = [s for s in socks if not is_loopback(s[2])]
    assert not wide, f"{len(wide)} of {len(socks)} sockets are not on loopback: {wide}"
    assert ray.gcs_address.startswith("127.0.0.1:")


def test_a_second_local_run_refuses_and_the_first_keeps_working(held_ray, tmp_path):
    from mae_service.data.synth import synthesize

    first = held_ray()
    gcs_pid = next(p for p in descendants(first.pid) if psutil.Process(p).name() == "gcs_server")
    synthesize(str(tmp_path / "data"), num_images=16, image_size=32, classes=2, fmt="files", seed=0, val_fraction=0.25)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_service",
            "pretrain",
            *TINY_MODEL,
            "train.num_workers=1",
            "train.batch_size=8",
            f"data.train_uri={tmp_path / 'data' / 'train'}",
            f"train.storage_path={tmp_path / 'ck'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.run_name=second",
        ],
        env=env_without_loopback_hint(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mae-service pretrain: error:")]
    assert len(lines) == 1, proc.stderr
    assert "another Ray instance runs on this machine" in lines[0]
    assert first.gcs_address in lines[0] and f"gcs_server PID {gcs_pid}" in lines[0]
    assert f"started by mae-service driver PID {first.pid}" in lines[0]
    assert "RAY_ADDRESS" in lines[0]
    assert not (tmp_path / "ck").exists()  # refused before anything was written
    if (tmp_path / "mlflow.db").exists():  # nor was an MLflow run left RUNNING
        import mlflow

        runs = mlflow.search_runs(search_all_experiments=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert runs.empty, runs
    out = first.release()
    assert "STILL 2" in out, out  # the first instance was not disturbed
    assert first.proc.returncode == 0
    assert not processes_under(first.temp_dir)
    assert not first.temp_dir.exists()  # a driver that exits normally removes its temp dir


def test_a_killed_drivers_leftovers_are_stopped_by_the_next_start(held_ray):
    ray = held_ray()
    os.kill(ray.pid, signal.SIGKILL)
    ray.proc.wait(30)
    # Ray's own processes share the driver's fate, except the raylet's agents: they keep running (and their ports)
    left = processes_under(ray.temp_dir)
    names = sorted(p.name() for p in left)
    assert left, "expected the raylet's agents to outlive a SIGKILLed driver"
    done = reap_leftovers()
    assert len(done) == 1, done
    assert f"driver PID {ray.pid}" in done[0] and str(ray.temp_dir) in done[0], done
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in left), names
    assert not processes_under(ray.temp_dir)
    assert not ray.temp_dir.exists()
