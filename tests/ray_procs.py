"""What the Ray-process tests look at: the listening sockets of a set of processes, whether an address is loopback,
and a local Ray started in a subprocess by :func:`mae_service.runtime.init_ray` (stopped by PID)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

# A local Ray started the way `mae-service pretrain` starts it (init_ray), with one task and one actor running, so
# workers listen too. Prints "READY <gcs address> <temp dir>" and stays up until its stdin closes.
HOLD_RAY = """
import os, sys
from mae_service.runtime import init_ray
init_ray(dashboard=True)
import ray
@ray.remote
class Holder:
    def pid(self):
        return os.getpid()
holder = Holder.remote()
ray.get(holder.pid.remote())
ray.get(ray.remote(lambda: 1).remote())
node = ray._private.worker.global_worker.node
print("READY", node.gcs_address, node.get_temp_dir_path(), flush=True)
sys.stdin.read()
print("STILL", ray.get(ray.remote(lambda: 2).remote()), flush=True)
"""


def is_loopback(host: str) -> bool:
    addr = ipaddress.ip_address(host.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, process name, host, port)`` of every listening TCP socket and bound UDP socket of ``pids``."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # SOCK_DGRAM
                out.append((pid, name, c.laddr.ip, c.laddr.port))
    return out


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def env_without_loopback_hint() -> dict[str, str]:
    """The caller's environment without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (the tests' own env sets it to 0):
    what a user's shell gives ``mae-service``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    return env


class HeldRay:
    """A local Ray in a subprocess (:data:`HOLD_RAY`); :meth:`stop` ends it and whatever it left, by PID."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 180):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_RAY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or env_without_loopback_hint(),
            cwd=ROOT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("local Ray subprocess exited:\n" + "".join(self.lines[-40:]))
            self.lines.append(line)
            if line.startswith("READY "):
                _, self.gcs_address, temp_dir = line.split()
                self.temp_dir = Path(temp_dir)
                self.pid = self.proc.pid
                return
        raise TimeoutError("local Ray subprocess not ready:\n" + "".join(self.lines[-40:]))

    def release(self, timeout: float = 120) -> str:
        """Close its stdin: it runs one more task and exits normally; returns the rest of its output."""
        out, _ = self.proc.communicate("", timeout=timeout)
        return out

    def stop(self) -> None:
        from mae_service.local_ray import processes_under, stop_processes

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        stop_processes(processes_under(self.temp_dir))


def stop_driver(proc, log) -> None:
    """End a driver started in its own process group (SIGKILL to the group if still running) and close its log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    log.close()
