"""MLflow helpers: tracking URI resolution, valid keys, secret scrubbing, retried logging.

Everything here is small and MLflow-version tolerant; the MLflow client is imported lazily
so that importing this module stays cheap (it is used by config checks and Ray workers).
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hescape import paths

T = TypeVar("T")

MASK = "***"
MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH

# --------------------------------------------------------------------------- tracking URI


def resolve_tracking_uri(cfg_uri: str | None, storage_dir: Path | str) -> str:
    """Return the MLflow tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite under storage_dir.

    The sqlite default is ``sqlite:///<absolute storage_dir>/mlflow.db``; the directory is
    created. A blank string counts as unset. PostgreSQL URIs go through ``normalize_db_uri``.
    """
    for candidate in (cfg_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate is not None and candidate.strip():
            return normalize_db_uri(candidate.strip())
    db = paths.mlflow_db(storage_dir)
    root = db.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the MLflow storage directory {root}: {exc.strerror}; "
            "set storage_dir to a writable path or MLFLOW_TRACKING_URI to a server"
        ) from exc
    return f"sqlite:///{db}"


ARTIFACT_LOCATION_ENV = "HESCAPE_ARTIFACT_LOCATION"
# Tracking URIs that name a server: it decides where artifacts go (--artifacts-destination).
_SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


def resolve_artifact_location(
    cfg_location: str | None, storage_dir: Path | str, tracking_uri: str, experiment: str
) -> str | None:
    """Artifact location of a new study experiment: ``<root>/<experiment>``.

    The root is explicit > ``$HESCAPE_ARTIFACT_LOCATION`` > ``<storage_dir>/mlartifacts`` (a
    ``file://`` URI). ``s3://bucket/prefix`` and other object-store URIs pass through. With a
    tracking *server* (http/https) and no explicit root, None: the server's artifact proxy
    decides. MLflow's own default, ``./mlruns`` of the current directory, is never used.
    """
    root = next((c.strip() for c in (cfg_location, os.environ.get(ARTIFACT_LOCATION_ENV))
                 if c is not None and c.strip()), None)
    name = _UNSAFE_PATH_CHARS.sub("_", experiment).strip("._") or "experiment"
    if root is None:
        if tracking_uri.partition("://")[0].lower() in _SERVER_SCHEMES:
            return None
        root = str(paths.artifact_root(storage_dir))  # <root>/<experiment>/<run_id>/artifacts
    if "://" in root or root.startswith("mlflow-artifacts:"):
        return f"{root.rstrip('/')}/{name}"
    return (paths.absolute(root) / name).as_uri()


def normalize_db_uri(uri: str) -> str:
    """Pin ``postgresql://`` to the installed driver: ``postgresql+psycopg2://`` when only psycopg2
    is installed (SQLAlchemy 2.1 otherwise picks psycopg 3 and fails with "No module named
    'psycopg'"). Other URIs, and ones naming a driver already, are returned unchanged.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return uri
    from importlib.util import find_spec

    if find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


# --------------------------------------------------------------------------- keys

_INVALID_KEY_CHARS = re.compile(r"[^a-z0-9_.\-/]+")
_REPEATED_UNDERSCORES = re.compile(r"_{2,}")


def sanitize_key(name: str) -> str:
    """Turn ``name`` into a valid, portable MLflow metric/param key (lower case).

    ``@`` is dropped (``R@5`` -> ``r5``), other characters outside ``[a-z0-9_.-/]`` (spaces,
    colons, ...) become ``_``, and path segments that MLflow rejects (empty, ``.``, ``..``)
    are removed: ``test//R@5`` -> ``test/r5``. Raises ValueError when nothing valid is left.
    """
    text = str(name).replace("@", "").lower()
    text = _REPEATED_UNDERSCORES.sub("_", _INVALID_KEY_CHARS.sub("_", text))
    parts = [p.strip("_") for p in text.split("/")]
    parts = [p for p in parts if p and p not in (".", "..")]
    key = "/".join(parts)[:MAX_KEY_LENGTH].rstrip("/")
    if not key:
        raise ValueError(f"metric/param name {name!r} has no valid characters left")
    return key


# --------------------------------------------------------------------------- params


def flatten(d: Mapping[str, Any], prefix: str = "", *, sep: str = ".") -> dict[str, Any]:
    """Flatten nested mappings into ``{"a.b.c": value}``; lists and scalars are leaves.

    An empty nested mapping is kept as the leaf value ``{}`` so that it is not lost.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, full, sep=sep))
        else:
            out[full] = value
    return out


# Key names whose values are secrets. "key" alone is too broad (batch_key, label_key are
# data columns), so only compound names that mean a credential count.
_SECRET_KEY_NAME = re.compile(
    r"pass(word|wd|phrase)|secret|credential"
    r"|(^|_)(pwd|pass|auth|dsn|token|cookie)$"
    r"|(^|_)(api|access|private|secret|signing|encryption|ssh|account|client|master|sas)_?key(_?id)?$",
    re.IGNORECASE,
)
# user:password@ in any URI (also inside longer strings: "--db postgresql://u:p@h/db").
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<pw>[^@\s/]*)@")
# query-string credentials: ?password=..., &token=..., &X-Amz-Signature=...
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|token|access_token|secret|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token|api_key|apikey)=)[^&\s;#]+",
    re.IGNORECASE,
)
# NAME=value assignments of credentials inside strings (env dumps, command lines).
_ASSIGNED_SECRET = re.compile(
    r"(?P<head>\b[A-Za-z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY)"
    r"[A-Za-z0-9_]*\s*=\s*)(?P<q>[\"']?)[^\s\"'&]+",
    re.IGNORECASE,
)
# Well-known credential shapes: AWS key ids, GitHub/HF/OpenAI/Slack tokens, bearer tokens,
# PEM private keys.
_TOKEN_SHAPES = re.compile(
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}\b"
    r"|\bgithub_pat_[A-Za-z0-9_]{20,}\b"
    r"|\bhf_[A-Za-z0-9]{20,}\b"
    r"|\bsk-[A-Za-z0-9_\-]{20,}\b"
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}\b"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]{16,}=*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)


def is_secret_key(name: str) -> bool:
    """True when a (possibly dotted) param name names a credential, e.g. ``db.password``."""
    last = re.split(r"[./]", str(name))[-1].replace("-", "_")
    return bool(_SECRET_KEY_NAME.search(last))


def scrub_text(text: str) -> str:
    """Mask credentials inside a string: URI passwords, query tokens, known token shapes."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", text)
    text = _ASSIGNED_SECRET.sub(lambda m: f"{m['head']}{m['q']}{MASK}", text)
    return _TOKEN_SHAPES.sub(MASK, text)


def scrub_value(value: Any) -> Any:
    """Scrub a value of any shape: strings are masked in place, containers recursively."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, bytes):
        return scrub_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: (MASK if is_secret_key(str(k)) else scrub_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return [scrub_value(v) for v in sorted(value, key=repr)]
    if isinstance(value, Path):
        return scrub_text(str(value))
    return value


def scrub_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``flat`` safe to log: secret-named keys -> ``***``, secrets in values masked.

    Secret-named keys are those ending in password/token/secret/credential(s)/api_key/
    access_key/... (not plain ``*_key`` such as ``batch_key``). Values are scanned for
    ``scheme://user:password@`` URIs (anywhere in the string, in nested lists/dicts),
    credential query parameters, and well-known token shapes (AWS, GitHub, HF, bearer).
    """
    return {
        key: (MASK if is_secret_key(key) and value not in (None, "") else scrub_value(value))
        for key, value in flat.items()
    }


# --------------------------------------------------------------------------- retry

_TRANSIENT_MESSAGES = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "deadlock detected",
    "could not serialize access",
    "lock wait timeout",
    "server closed the connection",
    "connection refused",
    "connection reset",
    "connection timed out",
    "could not connect to server",
    "connection to server",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "too many connections",
    "too many clients",  # PostgreSQL: "sorry, too many clients already" (max_connections)
    "remaining connection slots are reserved",
    "temporarily unavailable",
    "max retries exceeded",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
)
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def exception_chain(exc: BaseException | None) -> Iterable[BaseException]:
    """``exc`` and every exception behind it (cause, context, SQLAlchemy's ``orig``),
    each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend([cur.__cause__, cur.__context__, getattr(cur, "orig", None)])


def is_transient_error(exc: BaseException) -> bool:
    """True for errors worth retrying: sqlite locks, DB deadlocks/disconnects, network blips.

    Looks through the whole exception chain (MLflow wraps SQLAlchemy, which wraps the driver).
    """
    for cur in exception_chain(exc):
        if isinstance(cur, _TRANSIENT_TYPES):
            return True
        message = str(cur).lower()
        if isinstance(cur, sqlite3.OperationalError) and "locked" in message:
            return True
        if any(text in message for text in _TRANSIENT_MESSAGES):
            return True
    return False


RETRY_BUDGET_ENV = "HESCAPE_TRACKING_RETRY_S"
DEFAULT_RETRY_BUDGET_S = 120.0
# MLflow's own HTTP retries (urllib3, per request) default to 7 with backoff factor 2: about
# 2 minutes per request before ``with_retry`` even sees the error, and 120 s of read timeout
# per try. The study bounds them (``bound_http_retries``) so that ``with_retry``'s budget is
# what decides how long a call waits for the tracking server.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


class TrackingUnavailable(ConnectionError):
    """The tracking store kept failing with transient errors for the whole retry budget."""


def retry_budget_s() -> float:
    """How long a tracking call keeps retrying transient errors: ``$HESCAPE_TRACKING_RETRY_S``
    (seconds, default 120; a server restart takes a few seconds)."""
    raw = os.environ.get(RETRY_BUDGET_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_RETRY_BUDGET_S
    except ValueError:
        return DEFAULT_RETRY_BUDGET_S


def bound_http_retries() -> None:
    """Set MLflow's HTTP retry/timeout environment to ``HTTP_RETRY_DEFAULTS`` where the user
    has not set them (this process and the Ray workers it starts)."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def with_retry(
    fn: Callable[[], T],
    *,
    attempts: int = 8,
    base_delay: float = 0.1,
    max_delay: float = 5.0,
    is_transient: Callable[[BaseException], bool] = is_transient_error,
    budget_s: float | None = None,
) -> T:
    """Call ``fn()``; on a transient error retry with jittered exponential backoff.

    Non-transient errors are raised at once. Transient ones are retried until both
    ``attempts`` tries were made and ``budget_s`` seconds (default ``retry_budget_s()``)
    have passed since the first failure, so a tracking server that restarts is waited for,
    one that stays down is given up on in bounded time: then ``TrackingUnavailable`` is
    raised from the last error. ``fn`` must be safe to repeat (see ``log_metrics_retry``).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    budget = retry_budget_s() if budget_s is None else max(0.0, float(budget_s))
    first_failure: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            if attempt >= attempts and waited >= budget:
                raise TrackingUnavailable(
                    f"tracking store still failing after {attempt} tries over {waited:.0f} s "
                    f"(${RETRY_BUDGET_ENV}={budget:g}): {type(exc).__name__}: "
                    f"{scrub_text(str(exc))[:400]}"
                ) from exc
            delay = min(max_delay, base_delay * 2 ** min(attempt - 1, 30))
            if attempt >= attempts:  # past the tries, only the budget is left: do not overshoot
                delay = min(delay, max(0.05, budget - waited))
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto


def log_metrics_retry(
    client: Any,
    run_id: str,
    metrics: Mapping[str, float],
    step: int,
    *,
    timestamp_ms: int | None = None,
    attempts: int = 8,
    base_delay: float = 0.1,
) -> None:
    """Log ``metrics`` at ``step`` to ``run_id`` with ``client.log_batch``, retrying lock errors.

    Keys are passed through ``sanitize_key``. The timestamp is fixed once, before the first
    try, so a retried batch is an exact duplicate, which MLflow's store de-duplicates:
    retries never double-count. Batches larger than MLflow's limit are split.
    """
    from mlflow.entities import Metric

    ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    entities = [
        Metric(key=sanitize_key(k), value=float(v), timestamp=ts, step=int(step))
        for k, v in metrics.items()
    ]
    for start in range(0, len(entities), MAX_METRICS_PER_BATCH):
        chunk = entities[start : start + MAX_METRICS_PER_BATCH]
        with_retry(
            lambda chunk=chunk: client.log_batch(run_id, metrics=chunk),
            attempts=attempts,
            base_delay=base_delay,
        )
