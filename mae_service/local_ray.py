"""The local Ray instance a run starts when no cluster is given: on loopback only, one per machine, nothing left over.

Owns: :func:`start_local_ray` (what :func:`mae_service.runtime.init_ray` calls without ``RAY_ADDRESS``) and the
state it keeps under :func:`state_dir` (``$MAE_RAY_DIR``, default ``/tmp/mae-ray-<uid>``). Imports: Ray (lazily),
psutil, nothing from the rest of ``mae_service``.

- **Loopback.** ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray turns a loopback address into
  the machine's network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (then its gRPC servers bind
  127.0.0.1, and its agents, dashboard and metrics endpoint the node address). The variable is set before Ray
  starts (its processes inherit it) and the node address is checked afterwards.
- **One instance per machine.** Two local Rays break each other's runs (Ray Train's placement-group cleaner and the
  state API find "multiple active Ray instances"; a second ``ray.init()`` may join the first and starve it), so a
  run refuses to start beside another Ray (:class:`RayInstanceConflict`, naming its GCS address, session dir and
  PIDs) and never joins one by accident (``address="local"``).
- **No leftovers.** Each instance gets its own temp dir ``run-<driver pid>-<n>`` with an ``owner.json`` (driver PID
  and start time). Ray's own processes die with the driver, except the agents the raylet starts, which outlive a
  SIGKILLed driver for about a minute and keep the node's ports. The next start stops every process that still
  holds files under the dir of a driver that is gone (found by the dir, never by a program name), says so, and
  removes the dir; a driver that exits normally removes its own dirs.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATE_DIR_ENV = "MAE_RAY_DIR"
OWNER_FILE = "owner.json"
LOOPBACK = "127.0.0.1"
_RUN_DIR = re.compile(r"^run-(\d+)-(\d+)$")
_MINE: list[Path] = []  # the run dirs this process made (removed at exit)


class RayInstanceConflict(ValueError):
    """Another Ray instance runs on this machine: a second local one would break both runs."""


def state_dir() -> Path:
    """Where local instances keep their temp dirs (short: Ray's socket paths must fit in 107 bytes)."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / f"mae-ray-{os.getuid()}")


def _driver_alive(owner: dict[str, Any]) -> bool:
    import psutil

    try:
        proc = psutil.Process(int(owner["pid"]))
        return abs(proc.create_time() - float(owner["started"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _read_owner(run_dir: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def processes_under(run_dir: Path) -> list[Any]:
    """Live processes (``psutil.Process``) other than this one that have ``run_dir`` on their command line or a file
    open below it: every process of the Ray instance whose temp dir it is (Ray renames some of them, e.g.
    ``ray::DashboardAgent``, but their logs stay open)."""
    import psutil

    prefix = str(run_dir.resolve()) + os.sep
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if any(prefix in part for part in proc.info["cmdline"] or []) or any(
                f.path.startswith(prefix) for f in proc.open_files()
            ):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def stop_processes(procs: list[Any], timeout: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL what is still alive after ``timeout`` s; returns the PIDs stopped."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return sorted(p.pid for p in procs)


def reap_leftovers() -> list[str]:
    """Stop the processes left by local instances whose driver is gone and remove their dirs; returns what was done,
    one line per instance (also logged as warnings)."""
    root = state_dir()
    done = []
    for run_dir in sorted(root.glob("run-*")) if root.is_dir() else []:
        owner = _read_owner(run_dir)
        if owner is not None and _driver_alive(owner):
            continue
        if owner is None and _RUN_DIR.match(run_dir.name) and _driver_alive_by_name(run_dir.name):
            continue  # being set up by a live driver (owner.json comes right after ray.init)
        procs = processes_under(run_dir)
        if procs:
            pids = stop_processes(procs)
            line = (
                f"stopped {len(pids)} Ray processes left by a run whose driver is gone "
                f"(driver PID {owner.get('pid') if owner else '?'}, temp dir {run_dir}): PIDs "
                + " ".join(map(str, pids))
            )
            logger.warning(line)
            done.append(line)
        shutil.rmtree(run_dir, ignore_errors=True)
    return done


def _driver_alive_by_name(name: str) -> bool:
    import psutil

    m = _RUN_DIR.match(name)
    if m is None:
        return False
    return psutil.pid_exists(int(m.group(1))) and int(m.group(1)) != os.getpid()


def _flag(cmdline: list[str], name: str) -> str | None:
    """The value of ``--name=value`` / ``--name value`` (``-`` and ``_`` alike) on a command line."""
    want = name.replace("_", "-")
    for i, part in enumerate(cmdline):
        key, eq, value = part.partition("=")
        if key.lstrip("-").replace("_", "-") == want and part.startswith("-"):
            if eq:
                return value
            return cmdline[i + 1] if i + 1 < len(cmdline) else None
    return None


def other_instances() -> list[str]:
    """One description per Ray instance running on this machine (its GCS server process): address, session dir,
    PIDs, and the mae-service driver that started it when it is one of ours."""
    import psutil

    owners = {}
    root = state_dir()
    for run_dir in root.glob("run-*") if root.is_dir() else []:
        if (owner := _read_owner(run_dir)) is not None:
            owners[str(run_dir.resolve())] = owner
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] != "gcs_server" and not (cmd and os.path.basename(cmd[0]) == "gcs_server"):
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        session = _flag(cmd, "session_dir") or os.path.dirname(_flag(cmd, "log_dir") or "") or "?"
        driver = next((o for d, o in owners.items() if session.startswith(d + os.sep)), None)
        address = (driver or {}).get("gcs_address") or _gcs_address(proc, cmd)
        by = f", started by mae-service driver PID {driver['pid']}" if driver else ""
        found.append(f"GCS {address}, session {session}, gcs_server PID {proc.pid}{by}")
    return found


def _gcs_address(proc: Any, cmd: list[str]) -> str:
    """``ip:port`` of a GCS server: its port flag, else the port it listens on (a local instance picks one)."""
    import psutil

    ip = _flag(cmd, "node_ip_address") or "127.0.0.1"
    port = _flag(cmd, "gcs_server_port")
    if not port or port == "0":
        try:
            ports = sorted(c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
        except psutil.Error:
            ports = []
        port = "/".join(map(str, ports)) or "?"
    return f"{ip}:{port}"


def _cleanup_at_exit() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for run_dir in _MINE:
        shutil.rmtree(run_dir, ignore_errors=True)


def start_local_ray(*, num_cpus: int, dashboard: bool, object_store_bytes: int | None = None, **init_kw: Any) -> str:
    """Start this run's own local Ray on 127.0.0.1 (see the module docstring); returns its GCS address.

    Raises :class:`RayInstanceConflict` when another Ray instance runs on this machine (after stopping the
    leftovers of killed runs), RuntimeError when Ray did not come up on loopback.
    """
    reap_leftovers()
    if others := other_instances():
        raise RayInstanceConflict(
            "another Ray instance runs on this machine ("
            + "; ".join(others)
            + "): a second local Ray would break both runs; wait for it to end, stop it (ray stop, or kill the "
            "gcs_server PID and its session's processes), or run on it with RAY_ADDRESS=<its GCS address>"
        )
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray reads it (its processes inherit it)
    import ray
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: ray may have been imported before the variable was set
    root = state_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir = root / f"run-{os.getpid()}-{len(_MINE)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700)
    if not _MINE:
        atexit.register(_cleanup_at_exit)  # after ray.init's own atexit hook: runs first (LIFO)
    _MINE.append(run_dir)
    default_store = int(os.environ.get("MAE_OBJECT_STORE_BYTES", 1 << 30))
    info: Any = ray.init(
        address="local",  # never join another instance by accident
        num_cpus=num_cpus,
        _node_ip_address=LOOPBACK,
        _temp_dir=str(run_dir),
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        object_store_memory=min(2 << 30, object_store_bytes or default_store),
        **init_kw,
    )
    import psutil

    owner = {
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
        "gcs_address": info.address_info.get("gcs_address"),
        "session_dir": info.address_info.get("session_dir"),
    }
    (run_dir / OWNER_FILE).write_text(json.dumps(owner))
    node_ip = info.address_info.get("node_ip_address")
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not on {LOOPBACK}; nothing was trained")
    return str(owner["gcs_address"])
