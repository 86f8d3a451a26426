"""Helpers for tests that start Ray nodes with the CLI on this machine and take them away."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(*, token: bool = True) -> dict[str, str]:
    """The environment for `ray start` / `ray job`: the venv first (so Ray's workers and the
    job's `python` find the package); Ray 2.60's job server demands a token, which the
    cluster and the client share (``token=False``: a cluster without auth)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "0", "RAY_ADDRESS": ""}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    return env


def node_ports() -> list[str]:
    """Free-picked ports for one node: a default held by another Ray on this machine (agent
    52365, ...) leaves the node's agent down."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
             "--object-manager-port")
    return [f"{flag}={free_port()}" for flag in flags]


def pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line names ``temp_dir`` (a node's own --temp-dir)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def kill_node(temp_dir: str) -> list[int]:
    """SIGKILL every process of the node started with ``temp_dir`` and all their children
    (its workers, a job's driver): the machine is gone."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids_under(temp_dir):
        try:
            p = psutil.Process(pid)
            for q in (p, *p.children(recursive=True)):
                procs[q.pid] = q
        except psutil.NoSuchProcess:
            continue
    killed = []
    for p in procs.values():
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


def stop_nodes(*temp_dirs: str) -> None:
    """SIGTERM, then SIGKILL, every process under ``temp_dirs`` (test clean-up, by PID)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for temp_dir in temp_dirs:
            for pid in pids_under(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(2)


STARTUP_TIMEOUT = "timed out during startup"


def start_node(cmd: list[str], temp_dir: str, env: dict[str, str], *, attempts: int = 3):
    """Run a `ray start` command; a node whose raylet missed Ray's fixed 30 s registration
    window (a loaded 2-core machine) is stopped and started again, up to ``attempts`` times.
    Returns the last ``CompletedProcess`` (the caller asserts on its return code)."""
    import subprocess

    for attempt in range(attempts):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode == 0 or STARTUP_TIMEOUT not in out.stderr + out.stdout:
            return out
        stop_nodes(temp_dir)
        time.sleep(5 * (attempt + 1))
    return out


def start_cluster(head_cpus: int, worker_cpus: list[int], *, attempts: int = 3):
    """A ``ray.cluster_utils.Cluster`` with a head and one node per ``worker_cpus`` entry,
    started again (after a full shutdown) when a node misses Ray's 30 s start-up window."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
            for cpus in worker_cpus:
                cluster.add_node(num_cpus=cpus)
            return cluster
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(e) or attempt == attempts - 1:
                raise
            if cluster is not None:
                cluster.shutdown()
            time.sleep(5 * (attempt + 1))
    raise AssertionError("unreachable")
