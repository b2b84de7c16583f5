"""``cluster/local.sh``: two Ray nodes on loopback addresses, token auth on, jobs submitted with ``ray job submit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"
RAY = Path(sys.executable).parent / "ray"

# Runs as the job's driver on the head: what the cluster looks like from inside, and whether the caller's S3
# settings reached a worker process on the second node.
PROBE = """
import json, os, ray
ray.init()
@ray.remote(num_cpus=1, resources={"node:127.0.0.3": 0.01})
def on_worker_node():
    return ray.util.get_node_ip_address(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID")
ip, endpoint, key = ray.get(on_worker_node.remote())
print("PROBE " + json.dumps({
    "resources": ray.cluster_resources(),
    "nodes": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]),
    "worker_task_ip": ip, "worker_endpoint": endpoint, "worker_key_id": key,
    "driver_endpoint": os.environ.get("AWS_ENDPOINT_URL"),
}))
"""


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_up_exports_only_what_a_client_needs(local_cluster):
    assert set(local_cluster) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
    assert local_cluster["RAY_ADDRESS"] == "http://127.0.0.2:8265"
    assert local_cluster["RAY_AUTH_MODE"] == "token"
    token_file = Path(local_cluster["RAY_AUTH_TOKEN_PATH"])
    assert len(token_file.read_text().strip()) == 64
    assert token_file.stat().st_mode & 0o077 == 0, "the token file must be readable by its owner only"


def test_job_api_requires_the_token(local_cluster):
    jobs = local_cluster["RAY_ADDRESS"] + "/api/jobs/"
    token = Path(local_cluster["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert _get(jobs) in (401, 403)
    assert _get(jobs, "0" * 64) in (401, 403)
    assert _get(jobs, token) == 200


def test_ray_job_submit_runs_on_both_nodes(local_cluster, s3_server):
    env = {**os.environ, **local_cluster}
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.run(
        [str(RAY), "job", "submit", "--working-dir", ".", "--", "python", "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    probe = json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[len("PROBE ") :])
    assert probe["nodes"] == ["127.0.0.2", "127.0.0.3"]
    assert probe["resources"]["CPU"] == 4.0
    assert probe["resources"]["object_store_memory"] <= 2 * (1 << 30)
    assert probe["worker_task_ip"] == "127.0.0.3"
    assert probe["driver_endpoint"] == s3_server.endpoint
    assert probe["worker_endpoint"] == s3_server.endpoint
    assert probe["worker_key_id"] == "testing"


def test_up_while_up_fails_cleanly_and_env_reprints(local_cluster):
    again = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0
    assert again.stdout == ""
    assert "already up" in again.stderr
    env = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, timeout=60)
    assert env.returncode == 0
    assert f"export RAY_ADDRESS={local_cluster['RAY_ADDRESS']}" in env.stdout.splitlines()


@pytest.mark.parametrize("command", ["bogus", ""])
def test_bad_command_is_usage_error(command):
    proc = subprocess.run([str(SCRIPT), command], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "usage" in proc.stderr
    assert proc.stdout == ""
