"""hescape.tracking: keys, scrubbing, flatten, URI resolution, retry, and concurrent logging
to sqlite and to a real PostgreSQL server (tests/pg.py)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import pytest
from pg import postgres_server, postgres_uri  # noqa: F401 - fixtures

from hescape import tracking
from hescape.tracking import (
    TrackingUnavailable,
    flatten,
    is_transient_error,
    log_metrics_retry,
    resolve_tracking_uri,
    sanitize_key,
    scrub_params,
    with_retry,
)

# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("R@5", "r5"),
        ("test/R@5_img2gene", "test/r5_img2gene"),
        ("test/r@10_gene2img", "test/r10_gene2img"),
        ("val//mean rank", "val/mean_rank"),
        ("./a/../b", "a/b"),
        ("/leading/slash/", "leading/slash"),
        ("a:b", "a_b"),
        ("loss (train)", "loss_train"),
        ("probe/pearson-mean.v2", "probe/pearson-mean.v2"),
        ("x__@y", "x_y"),
        ("ΔiLISI", "ilisi"),
    ],
)
def test_sanitize_key(raw: str, expected: str) -> None:
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    key = sanitize_key(raw)
    assert key == expected
    _validate_metric_name(key)  # raises if MLflow would reject it
    _validate_param_name(key)


def test_sanitize_key_is_idempotent_and_bounded() -> None:
    long = "a/" * 300 + "R@5"
    key = sanitize_key(long)
    assert len(key) <= 250 and not key.endswith("/")
    assert sanitize_key(key) == key


@pytest.mark.parametrize("raw", ["", "@@", "/", "./..", "¿?"])
def test_sanitize_key_rejects_empty(raw: str) -> None:
    with pytest.raises(ValueError, match="no valid characters"):
        sanitize_key(raw)


# --------------------------------------------------------------------------- flatten


def test_flatten_nested() -> None:
    cfg = {"model": {"image": {"name": "vit", "dim": 512}, "gene": {"layers": [1, 2]}},
           "seed": 0, "empty": {}}  # fmt: skip
    assert flatten(cfg) == {
        "model.image.name": "vit",
        "model.image.dim": 512,
        "model.gene.layers": [1, 2],
        "seed": 0,
        "empty": {},
    }
    assert flatten({"a": {"b": 1}}, "cfg") == {"cfg.a.b": 1}
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}


# --------------------------------------------------------------------------- scrubbing

SECRETS = [
    "hunter2",
    "s3cr3t-pw",
    "tok_0123456789abcdef",
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "hf_abcdefghijklmnopqrstuvwxyz012345",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "p%40ss",
    "querytok123",
    "envsecret999",
    "bearertokenvalue0123456789",
]


def _config_with_secrets() -> dict:
    return {
        "data": {"batch_key": "donor", "label_key": "state", "path": "/data/hest/TENX95"},
        "mlflow": {
            "tracking_uri": "postgresql://mlflow:hunter2@db.internal:5432/mlflow",
            "password": "s3cr3t-pw",
            "hf_token": "tok_0123456789abcdef",
        },
        "storage": {
            "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE",
            "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "endpoint": "https://minio:9000",
        },
        "cmd": [
            "--weights",
            "hf_abcdefghijklmnopqrstuvwxyz012345",
            {"remote": "https://bot:ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/x.git"},
            ("mysql://root:p%40ss@localhost/db",),
        ],
        "notes": "fetch https://host/f?x=1&token=querytok123 with AWS_SECRET_ACCESS_KEY=envsecret999",
        "header": "Authorization: Bearer bearertokenvalue0123456789",
        "model": {"gene": {"tokenizer": "bpe", "max_tokens": 4096}},
    }


def test_scrub_params_removes_every_secret() -> None:
    scrubbed = scrub_params(flatten(_config_with_secrets()))
    text = repr(scrubbed)
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} survived scrubbing: {text}"
    # what is useful for lineage survives
    assert scrubbed["data.batch_key"] == "donor"
    assert scrubbed["data.label_key"] == "state"
    assert scrubbed["data.path"] == "/data/hest/TENX95"
    assert scrubbed["mlflow.tracking_uri"] == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert scrubbed["storage.endpoint"] == "https://minio:9000"
    assert scrubbed["mlflow.password"] == "***"
    assert scrubbed["model.gene.tokenizer"] == "bpe"
    assert scrubbed["model.gene.max_tokens"] == 4096


def test_scrub_params_keeps_unset_secrets_visible_and_does_not_mutate() -> None:
    flat = {"db.password": None, "api_key": "", "lr": 3e-4, "uri": "sqlite:///runs/mlflow.db"}
    before = dict(flat)
    assert scrub_params(flat) == flat
    assert flat == before


# --------------------------------------------------------------------------- tracking URI


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None, Path("runs/sub"))
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/sub/mlflow.db"
    assert (tmp_path / "runs" / "sub").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, "runs") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("  ", "runs") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db", "runs") == "sqlite:///x.db"


def test_resolve_artifact_location(tmp_path: Path, monkeypatch) -> None:
    resolve = tracking.resolve_artifact_location
    monkeypatch.delenv(tracking.ARTIFACT_LOCATION_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    sqlite = "sqlite:///x/mlflow.db"
    # default: per experiment under storage_dir, absolute (never ./mlruns of the cwd)
    assert resolve(None, "runs", sqlite, "demo") == (tmp_path / "runs/mlartifacts/demo").as_uri()
    assert resolve(None, "runs", "postgresql+psycopg2://h/db", "a b/c") == (
        tmp_path / "runs/mlartifacts/a_b_c").as_uri()
    # a tracking server decides where artifacts go unless a root is configured
    assert resolve(None, "runs", "http://127.0.0.1:5000", "demo") is None
    assert resolve("s3://bucket/hescape/", "runs", "http://h:5000", "demo") == (
        "s3://bucket/hescape/demo")
    # explicit > environment > storage_dir; a relative local root is made absolute
    monkeypatch.setenv(tracking.ARTIFACT_LOCATION_ENV, "gs://env-bucket")
    assert resolve(None, "runs", sqlite, "demo") == "gs://env-bucket/demo"
    assert resolve(" ", "runs", sqlite, "demo") == "gs://env-bucket/demo"
    assert resolve("art", "runs", sqlite, "demo") == (tmp_path / "art/demo").as_uri()


def test_normalize_db_uri_pins_installed_driver() -> None:
    from importlib.util import find_spec

    uri = tracking.normalize_db_uri("postgresql://u:p@127.0.0.1:5432/db")
    if find_spec("psycopg") is None:
        assert uri == "postgresql+psycopg2://u:p@127.0.0.1:5432/db"
    assert tracking.normalize_db_uri("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert tracking.normalize_db_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking.normalize_db_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_resolve_tracking_uri_unwritable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="MLflow storage directory"):
        resolve_tracking_uri(None, blocker / "runs")


# --------------------------------------------------------------------------- retry


def test_with_retry_retries_locks_then_succeeds(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert with_retry(flaky, attempts=5, base_delay=0.01) == "ok"
    assert len(calls) == 3


def test_with_retry_gives_up_and_does_not_retry_real_errors(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def locked() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(TrackingUnavailable) as info:
        with_retry(locked, attempts=4, base_delay=0.01, budget_s=0)
    assert len(calls) == 4
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "4 tries" in str(info.value) and "database is locked" in str(info.value)

    calls.clear()

    def broken() -> None:
        calls.append(1)
        raise ValueError("bad metric")

    with pytest.raises(ValueError):
        with_retry(broken, attempts=4)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="attempts"):
        with_retry(lambda: None, attempts=0)


def test_with_retry_waits_out_its_time_budget_then_gives_up(monkeypatch) -> None:
    """Past its tries, a transient error is retried until the budget (a server restart) has
    passed since the first failure; then TrackingUnavailable, never an endless wait."""
    clock = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(tracking.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setenv("HESCAPE_TRACKING_RETRY_S", "30")
    calls = []

    def down_for_20_s() -> str:
        calls.append(clock[0])
        if clock[0] - calls[0] < 20:
            raise ConnectionRefusedError("connection refused")
        return "ok"

    assert with_retry(down_for_20_s, attempts=3) == "ok"
    assert len(calls) > 3  # kept going past its 3 tries, inside the 30 s budget

    calls.clear()

    def down() -> None:
        calls.append(clock[0])
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(TrackingUnavailable, match="HESCAPE_TRACKING_RETRY_S=30"):
        with_retry(down, attempts=3)
    assert 30 <= calls[-1] - calls[0] <= 40  # gave up once the budget had passed


def test_is_transient_error_sees_wrapped_causes() -> None:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    try:
        try:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
        except OperationalError as inner:
            raise MlflowException(str(inner)) from inner
    except MlflowException as exc:
        assert is_transient_error(exc)
    assert is_transient_error(ConnectionResetError("reset by peer"))
    assert is_transient_error(RuntimeError("deadlock detected"))
    assert not is_transient_error(ValueError("Invalid metric name: 'r@5'"))
    assert not is_transient_error(sqlite3.OperationalError("no such table: runs"))


class _FlakyClient:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list] = []

    def log_batch(self, run_id: str, metrics: list) -> None:
        self.calls.append(list(metrics))
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")


def test_log_metrics_retry_same_timestamp_on_retry(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    client = _FlakyClient(failures=2)
    log_metrics_retry(client, "run", {"val/R@5": 0.5, "loss": 1.0}, step=3)
    assert len(client.calls) == 3
    first = client.calls[0]
    assert [m.key for m in first] == ["val/r5", "loss"]
    assert all(m.step == 3 for m in first)
    # a retried batch is an exact duplicate (MLflow de-duplicates it) -> nothing is doubled
    assert all(call == first for call in client.calls)


def test_log_metrics_retry_splits_large_batches() -> None:
    client = _FlakyClient(failures=0)
    log_metrics_retry(client, "run", {f"m{i}": float(i) for i in range(2500)}, step=0)
    assert [len(c) for c in client.calls] == [1000, 1000, 500]


# --------------------------------------------------------------------------- concurrency

N_PROCS = 4
N_STEPS = 40
WORKER_TIMEOUT_S = 300


def _log_worker(uri: str, run_ids: list[str], index: int, barrier, results) -> None:
    """Child process: log N_STEPS batches to its own run and to the shared run."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        own_run, shared_run = run_ids[index], run_ids[-1]
        barrier.wait(timeout=120)
        t0 = time.perf_counter()
        for step in range(N_STEPS):
            log_metrics_retry(
                client, own_run, {"train/loss": 1.0 / (step + 1), "val/R@5": step / N_STEPS},
                step=step, attempts=30, base_delay=0.05,
            )  # fmt: skip
            # the shared run: a per-worker key plus one key every worker writes (distinct steps)
            log_metrics_retry(
                client, shared_run, {f"worker{index}/loss": float(step), "all/heartbeat": 1.0},
                step=index * N_STEPS + step, attempts=30, base_delay=0.05,
            )  # fmt: skip
        results.put((index, "ok", time.perf_counter() - t0))
    except BaseException as exc:  # report to the parent rather than dying silently
        results.put((index, f"{type(exc).__name__}: {exc}", 0.0))
        raise


def _run_concurrent_logging(uri: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    t_setup = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)  # creates/migrates the schema once, in the parent
    exp = client.create_experiment(f"concurrency-{time.time_ns()}")
    run_ids = [client.create_run(exp, run_name=f"worker{i}").info.run_id for i in range(N_PROCS)]
    run_ids.append(client.create_run(exp, run_name="shared").info.run_id)
    setup_s = time.perf_counter() - t_setup

    ctx = mp.get_context("spawn")  # no SQLAlchemy engines or threads inherited across fork
    barrier, results = ctx.Barrier(N_PROCS), ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_log_worker, args=(uri, run_ids, i, barrier, results))
             for i in range(N_PROCS)]  # fmt: skip
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=WORKER_TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall_s = time.perf_counter() - t0
    failures = [o for o in outcomes if o[1] != "ok"]
    assert not failures, f"workers failed: {failures}"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    for i in range(N_PROCS):
        for key in ("train/loss", "val/r5"):
            history = client.get_metric_history(run_ids[i], key)
            assert sorted(m.step for m in history) == list(range(N_STEPS)), (i, key, len(history))
    shared = run_ids[-1]
    for i in range(N_PROCS):
        steps = sorted(m.step for m in client.get_metric_history(shared, f"worker{i}/loss"))
        assert steps == list(range(i * N_STEPS, (i + 1) * N_STEPS))
    heartbeat = client.get_metric_history(shared, "all/heartbeat")
    assert sorted(m.step for m in heartbeat) == list(range(N_PROCS * N_STEPS))
    latest = client.get_run(shared).data.metrics
    assert set(latest) == {"all/heartbeat"} | {f"worker{i}/loss" for i in range(N_PROCS)}
    return {"setup_s": setup_s, "wall_s": wall_s, "max_worker_s": max(o[2] for o in outcomes)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_logging_sqlite_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path / "runs")
    timings = _run_concurrent_logging(uri)
    print(f"sqlite concurrency ({N_PROCS} procs x {N_STEPS} steps x 2 runs): {timings}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_logging_postgres_loses_nothing(postgres_uri: str) -> None:  # noqa: F811
    assert postgres_uri.startswith("postgresql+psycopg2://") and "@127.0.0.1:" in postgres_uri
    timings = _run_concurrent_logging(postgres_uri)
    print(f"postgres concurrency ({N_PROCS} procs x {N_STEPS} steps x 2 runs): {timings}")
