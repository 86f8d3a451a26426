"""Probe every external endpoint a study talks to, with a short timeout, before anything is
written: the MLflow tracking store, the artifact store and the Ray cluster address.

A closed port or an unroutable host otherwise hangs inside a client library's retries
(MLflow's HTTP client retries for minutes; ``ray.init`` retries the GCS every 30 s). Each
check returns None when the endpoint answers, else one line naming the setting that points
there and the fix. The timeout is ``$HESCAPE_PROBE_TIMEOUT_S`` (default 3 s).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

TIMEOUT_ENV = "HESCAPE_PROBE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3.0
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432,
                  "mysql": 3306, "mssql": 1433, "ray": 10001}
_DB_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")


def probe_timeout() -> float:
    """Seconds one probe may take (``$HESCAPE_PROBE_TIMEOUT_S``, default 3)."""
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def tcp_problem(host: str, port: int, timeout: float | None = None) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout``, else why not
    (host not found / connection refused / no answer within N s)."""
    timeout = probe_timeout() if timeout is None else timeout
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except socket.gaierror:
        return f"host {host!r} not found (DNS)"
    except ConnectionRefusedError:
        return f"connection to {host}:{port} refused (nothing listens there)"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s (host down or unroutable)"
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or exc})"


def _host_port(uri: str, scheme: str) -> tuple[str, int] | None:
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    return host, port or _DEFAULT_PORTS.get(scheme.split("+")[0], 0)


def http_problem(url: str, timeout: float | None = None, *, mlflow: bool = False) -> str | None:
    """None when an HTTP server answers at ``url`` (any status), else why not. ``mlflow``:
    it must answer MLflow's ``GET /health`` (200; 401/403: behind authentication)."""
    timeout = probe_timeout() if timeout is None else timeout
    hp = _host_port(url, urlsplit(url).scheme.lower())
    if hp is None:
        return f"{url!r} has no host"
    problem = tcp_problem(*hp, timeout=timeout)
    if problem:
        return problem
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):  # noqa: S310
            return None
    except urllib.error.HTTPError as exc:
        if not mlflow or exc.code in (401, 403):
            return None  # an HTTP server answered: it is there
        return (f"{hp[0]}:{hp[1]} answers HTTP but not as an MLflow tracking server "
                f"(GET /health: {exc.code})")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{hp[0]}:{hp[1]} accepts connections but no HTTP server answered ({reason})"


def _writable_problem(path: Path) -> str | None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def tracking_problem(uri: str, *, setting: str) -> str | None:
    """Probe an MLflow tracking URI; ``setting`` names where it came from (the config key
    or the environment variable) for the message."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else "file"
    base = scheme.split("+")[0]
    problem = None
    if base in ("http", "https"):
        problem = http_problem(uri, mlflow=True)
        fix = ("start the tracking server (README: Reviewing a study in MLflow), correct the "
               "URI, or unset it to track in sqlite under storage_dir")
    elif base in _DB_SCHEMES:
        hp = _host_port(uri, base)
        problem = tcp_problem(*hp) if hp else f"{base} URI without a host"
        fix = "start the database, correct the URI, or unset it to track in sqlite under storage_dir"
    elif base == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and path != ":memory:":
            problem = _writable_problem(Path(path).parent)
        fix = "point it at a writable directory or unset it (sqlite under storage_dir)"
    elif base == "file":
        problem = _writable_problem(Path(uri.split("://", 1)[-1]))
        fix = "point it at a writable directory or unset it (sqlite under storage_dir)"
    if problem is None:
        return None
    return f"{setting}={_scrub(uri)}: MLflow tracking store unreachable: {problem}. Fix: {fix}."


def artifact_problem(location: str | None, *, setting: str) -> str | None:
    """Probe an artifact store: a local directory must be writable; an object store's
    endpoint (``$MLFLOW_S3_ENDPOINT_URL`` for s3) or an http(s) store must answer."""
    if not location:
        return None
    scheme = location.partition("://")[0].lower() if "://" in location else "file"
    fix = "correct it, start the store, or unset it to keep artifacts under storage_dir"
    if scheme == "file":
        problem = _writable_problem(Path(urlsplit(location).path if "://" in location
                                         else location))
    elif scheme in ("http", "https"):
        problem = http_problem(location)
    elif scheme == "s3":
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "https://s3.amazonaws.com"
        hp = _host_port(endpoint, urlsplit(endpoint).scheme.lower())
        problem = tcp_problem(*hp) if hp else None
        if problem:
            problem = f"{problem} (the S3 endpoint {endpoint}; $MLFLOW_S3_ENDPOINT_URL)"
    elif scheme == "gs":
        problem = tcp_problem("storage.googleapis.com", 443)
    else:
        return None
    if problem is None:
        return None
    return f"{setting}={_scrub(location)}: artifact store unreachable: {problem}. Fix: {fix}."


def ray_address_problem(address: str | None) -> str | None:
    """Probe the Ray cluster a study would join (``address``, else ``$RAY_ADDRESS``):
    ``host:port`` (the GCS), ``ray://host:port`` (Ray Client) or ``auto`` (the last
    ``ray start`` on this host). None: no address (a local Ray is started) or it answers."""
    setting = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        return None
    fix = ("start the cluster (`ray start --head`), correct the address, or leave --address "
           "and RAY_ADDRESS unset to start a local Ray")
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            target = canonicalize_bootstrap_address_or_die("auto")
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError/ValueError
            return f"{setting}=auto: no running Ray cluster found on this host ({exc}). Fix: {fix}."
    if target.startswith("ray://"):
        hp = _host_port(target, "ray")
    elif "://" in target:
        return (f"{setting}={address}: not a Ray address (use host:port of the head's GCS, "
                "e.g. 10.0.0.1:6379, or ray://host:10001). Fix: correct the address.")
    else:
        host, _, port = target.rpartition(":")
        hp = (host, int(port)) if host and port.isdigit() else None
    if hp is None:
        return (f"{setting}={address}: not host:port (e.g. 127.0.0.1:6379 or "
                "ray://host:10001). Fix: correct the address.")
    problem = tcp_problem(*hp)
    if problem is None:
        return None
    return f"{setting}={address}: no Ray cluster answers: {problem}. Fix: {fix}."


def _scrub(text: str) -> str:
    from hescape.tracking import scrub_text

    return scrub_text(text)
