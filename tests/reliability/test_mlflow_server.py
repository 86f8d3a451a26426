"""The shared MLflow tracking server (PostgreSQL backend) under load and restarts (issue 23.3).

(a) The load benchmark at smoke size (8 trial processes against a Postgres-backed
    ``mlflow server``): every run, param, tag, metric value (history per key) and artifact
    sent arrives, counted in the database.
(b) A real tiny study logs to such a server over HTTP; while its trials log, the server is
    stopped and started again on the same port (down ~10 s). The study finishes, every
    trial's run is FINISHED, one run per trial, and each evaluation step of ``val/loss`` is in
    MLflow exactly once.
(c) The server is stopped for good while trials log: the study exits non-zero with one clear
    ``error:`` line naming the tracking URI and what to do, within the retry budget
    (``HESCAPE_TRACKING_RETRY_S``, 10 s here), not hanging (hard subprocess timeout).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg import PostgresServer, postgres_server  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
MAX_STEPS, EVAL_EVERY = 24, 3
OVERRIDES = ["--set=sweep.max_concurrent=2", f"--set=train.max_steps={MAX_STEPS}",
             f"--set=train.eval_every={EVAL_EVERY}"]


def _fresh_database(pg: PostgresServer, name: str) -> str:
    """A database of its own on the session's server (each test starts from empty)."""
    import psycopg2

    conn = psycopg2.connect(pg.libpq_uri.rsplit("/", 1)[0] + "/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return pg.uri.rsplit("/", 1)[0] + "/" + name


def _val_loss_rows(db_uri: str) -> int:
    import psycopg2

    conn = psycopg2.connect(db_uri.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM metrics WHERE key = 'val/loss'")
            return int(cur.fetchone()[0])
    except psycopg2.Error:  # tables not created yet
        return 0
    finally:
        conn.close()


def _start_study(store: Path, url: str, budget_s: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "MLFLOW_TRACKING_URI": url, "HESCAPE_TRACKING_RETRY_S": str(budget_s)}
    args = [sys.executable, str(ROOT / "study/run.py"), str(ROOT / "experiments/tiny.yaml"),
            f"--set=storage_dir={store}", *OVERRIDES]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_until_logging(proc: subprocess.Popen, db_uri: str, timeout: float = 300) -> int:
    """Block until a trial has logged its first val/loss (the study is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _val_loss_rows(db_uri)
        if rows:
            return rows
        assert proc.poll() is None, "the study ended before any trial logged val/loss"
        time.sleep(0.2)
    raise AssertionError(f"no val/loss logged within {timeout:g} s")


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"study still running after {timeout:g} s (hung):\n{err[-3000:]}"
                             ) from None
    return proc.returncode, out, err


def test_smoke_load_loses_nothing(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.mlflow_load import SMOKE, run_scenario

    row = run_scenario(SMOKE[0], tmp_path)
    assert row["n_problems"] == 0, row["problems"]
    assert row["failed"] == {}, row["client_errors"]
    assert row["lost"] == {"runs": 0, "params": 0, "tags": 0, "metric_values": 0,
                           "artifacts": 0}
    assert row["arrived"]["metric_values"] == 8 * 5 * 25 and row["arrived"]["artifacts"] == 24


def test_study_survives_a_tracking_server_restart(tmp_path, postgres_server):  # noqa: F811
    db = _fresh_database(postgres_server, "restart")
    from benchmarks.mlflow_server import MlflowServer

    server = MlflowServer(db, tmp_path / "artifacts", workers=2, log_path=tmp_path / "mlflow.log")
    server.start()
    try:
        proc = _start_study(tmp_path / "store", server.url, budget_s=120)
        before = _wait_until_logging(proc, db)
        server.stop()  # SIGTERM the server's process group, mid-study
        time.sleep(10)
        assert proc.poll() is None, "the study ended while the server was down"
        server.start()
        rc, out, err = _finish(proc, timeout=540)
        assert rc == 0, err[-4000:]
        after = _val_loss_rows(db)
        assert after > before  # trials logged after the restart too

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id], "tags.`hescape.role` = 'trial'")
        trials = [r.data.tags["ray.trial_id"] for r in runs]
        assert len(runs) == 2 and len(set(trials)) == 2, trials  # one run per trial
        expected = list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
        for run in runs:
            assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
            assert sorted(steps) == expected, (run.info.run_name, sorted(steps))
        parent = client.search_runs([exp.experiment_id], "tags.`hescape.role` = 'parent'")
        assert parent[0].info.status == "FINISHED"
    finally:
        server.stop()


def test_study_fails_clearly_when_the_tracking_server_stays_down(tmp_path,
                                                                 postgres_server):  # noqa: F811
    db = _fresh_database(postgres_server, "down")
    from benchmarks.mlflow_server import MlflowServer

    server = MlflowServer(db, tmp_path / "artifacts", workers=2, log_path=tmp_path / "mlflow.log")
    server.start()
    try:
        proc = _start_study(tmp_path / "store", server.url, budget_s=10)
        _wait_until_logging(proc, db)
        server.stop()  # and never again
        rc, out, err = _finish(proc, timeout=300)
    finally:
        server.stop()
    assert rc != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-4000:]
    line = errors[0]
    assert f"MLflow tracking server {server.url} unreachable" in line, line
    assert "--resume" in line and "HESCAPE_TRACKING_RETRY_S" in line, line
