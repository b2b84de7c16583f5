"""Real services for the tests, started as subprocesses on 127.0.0.1 and stopped by PID.

- :class:`S3Server`: ``moto_server`` (S3 API), with a helper to make buckets.
- :class:`MlflowServer`: ``mlflow server`` with a SQLite store and artifacts on the S3 server.
Both are used by the fixtures in ``conftest.py``; scripts and benchmarks may use them too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
            time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout}s: {last}")


def stop_pid(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a server we started (its whole process group), by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class S3Server:
    """A moto S3 server on 127.0.0.1."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "moto.log"  # one line per request served
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        env = {**os.environ, **AWS_TEST_ENV, **QUIET_ENV}
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_http(f"{self.endpoint}/moto-api/", 30, self.proc)

    @property
    def env(self) -> dict[str, str]:
        """What a client (or a Ray worker) needs to reach this server."""
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, config=None):
        """A boto3 client of this server (``config``: a ``botocore.config.Config``, e.g. short timeouts)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=config,
        )

    def make_bucket(self, name: str) -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def requests(self, method: str, path_prefix: str) -> int:
        """How many ``method`` requests for paths starting with ``path_prefix`` (``/bucket/key...``) were served."""
        text = self.log_path.read_text(errors="replace")
        return len(re.findall(rf"(?<![A-Z]){method} {re.escape(path_prefix)}\S* HTTP/", text))

    def stop(self) -> None:
        stop_pid(self.proc)
        self._log.close()


class MlflowServer:
    """``mlflow server`` on 127.0.0.1: SQLite backend store, artifacts proxied to the S3 server.

    ``port``: a given port (default: a free one). :meth:`kill` and :meth:`start` stop and restart it on the same
    port with the same store and artifact root; :meth:`pause`/:meth:`resume` SIGSTOP/SIGCONT its process group (a
    hung server: connections are accepted by the kernel, never answered)."""

    def __init__(self, workdir: Path, s3: S3Server, bucket: str = "mlflow-artifacts", port: int | None = None):
        s3.make_bucket(bucket)
        self.workdir, self.bucket = workdir, bucket
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db_path = workdir / "mlflow.db"
        self._env = {
            **os.environ,
            **QUIET_ENV,
            **s3.env,
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        self.start()

    def start(self) -> None:
        """Start the server (again) and wait until it is healthy."""
        self._log = open(self.workdir / "mlflow-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.db_path}",
                "--artifacts-destination",
                f"s3://{self.bucket}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
            cwd=self.workdir,
        )
        wait_http(f"{self.uri}/health", 90, self.proc)

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash: no clean shutdown) and wait until its port is free."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
                try:
                    s.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.3)
        raise TimeoutError(f"port {self.port} still in use 60 s after the MLflow server was killed")

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            except ProcessLookupError:
                pass
        stop_pid(self.proc)
        self._log.close()


class BasicAuthProxy:
    """An HTTP reverse proxy on 127.0.0.1 that asks for basic-auth credentials (as nginx in front of an MLflow
    server does) and forwards what carries them to ``upstream``. Serves from a thread of this process."""

    def __init__(self, upstream: str, user: str, password: str):
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.refused = 0

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                if self.path != "/health" and self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
                req = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
                try:
                    resp = urllib.request.urlopen(req, timeout=60)
                except urllib.error.HTTPError as e:
                    resp = e
                data = resp.read()
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def uri(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user is not None else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
