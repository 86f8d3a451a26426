"""A local ``mlflow server`` process (PostgreSQL backend, served artifacts) that can be stopped
and started again on the same port: the load benchmark and the restart tests drive it.

``MlflowServer(backend_uri, artifacts_dir, workers=4).start()`` runs
``mlflow server --backend-store-uri ... --artifacts-destination file://... --serve-artifacts
--host 127.0.0.1 --port <free port> --workers N`` in its own process group, waits for
``/health`` and returns; ``stop()`` ends that group (SIGTERM, then SIGKILL). ``extra_env``
reaches the server only (``MLFLOW_SQLALCHEMYSTORE_POOL_SIZE``, ``..._MAX_OVERFLOW``). Its
output goes to ``log_path`` (appended across restarts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_executable() -> str:
    """The ``mlflow`` next to this Python (the project's venv), else the one on PATH."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


class MlflowServer:
    """One ``mlflow server`` on 127.0.0.1; ``start``/``stop`` keep the port."""

    def __init__(self, backend_uri: str, artifacts_dir: Path, *, workers: int = 4,
                 port: int | None = None, extra_env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.backend_uri = backend_uri
        self.artifacts_dir = Path(artifacts_dir)
        self.workers = int(workers)
        self.port = port or free_port()
        self.extra_env = dict(extra_env or {})
        self.log_path = Path(log_path) if log_path else self.artifacts_dir.parent / "mlflow.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [mlflow_executable(), "server", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", self.artifacts_dir.resolve().as_uri(),
                "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers)]  # fmt: skip

    def start(self, timeout: float = 120.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers (RuntimeError otherwise)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):  # noqa: S310
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy within {timeout:g} s:\n" + self.log_tail())

    def stop(self, grace: float = 15.0) -> None:
        """End the server's process group: SIGTERM, SIGKILL after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # workers can outlive the master for a moment: make sure the group is gone
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
