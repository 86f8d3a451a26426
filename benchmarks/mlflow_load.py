"""Load on a PostgreSQL-backed MLflow tracking server: throughput, latency, nothing lost, and
where it breaks (issue 23.3).

    python -m benchmarks.mlflow_load            # full: 64/128/256 trials + the breaking points
    python -m benchmarks.mlflow_load --smoke    # 8 trials, a few reports (the test's size)

Each scenario starts a fresh throwaway PostgreSQL (``tests/pg.py``, 127.0.0.1, a temp dir,
its ``max_connections``) and an ``mlflow server`` over it (``benchmarks/mlflow_server.py``:
``--serve-artifacts`` into a local dir, ``--workers``, pool env). N "trials" (separate
processes forked after MLflow is imported, each with its own ``MlflowClient`` over HTTP) start
together and log what a sweep trial logs: a child run, ~150 params (batches of 100), tags,
``reports`` metric batches of 25 keys (one per evaluation, fixed timestamp per batch as
``log_metrics_retry`` does) and a few artifacts (PNG-like and JSON, 50-500 KB), then close
the run. Trials log flat out (no pause between reports): far above a real sweep's rate, so
the figures are the server's ceiling.

Calls go through the project's retry (``hescape.tracking.with_retry``: 8 tries, ~11 s of
backoff). MLflow's own HTTP retries are turned off in the trials
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``) so that every failed request is seen and counted
(``retried``) instead of being hidden in urllib3; ``failed`` counts calls that failed all 8
tries. Afterwards the database is counted directly (runs, params, tags, metric rows per
key = history length, run status) and the artifact directory listed, against what was sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N_PARAMS, N_TAGS, N_KEYS = 150, 12, 25
ARTIFACT_SIZES = {"plots/umap.png": 480_000, "plots/curves.png": 120_000,
                  "eval/per_donor.json": 60_000}  # fmt: skip
CALLS = ("create_run", "log_params", "set_tags", "log_metrics", "log_artifact", "set_terminated")


@dataclass(frozen=True)
class Scenario:
    """One load level: trials, reports each, server workers, Postgres and pool limits."""

    name: str
    trials: int
    reports: int
    workers: int = 4
    max_connections: int = 100
    pool_size: int | None = None  # MLFLOW_SQLALCHEMYSTORE_POOL_SIZE (SQLAlchemy default 5)
    max_overflow: int | None = None  # MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW (default 10)
    request_timeout: int = 60  # MLFLOW_HTTP_REQUEST_TIMEOUT in the trials (s)

    def server_env(self) -> dict[str, str]:
        env = {}
        if self.pool_size is not None:
            env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] = str(self.pool_size)
        if self.max_overflow is not None:
            env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"] = str(self.max_overflow)
        return env


@dataclass
class TrialResult:
    index: int
    run_id: str = ""
    latencies: dict[str, list[float]] = field(default_factory=dict)
    retried: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    signatures: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    sent_metrics: int = 0
    finished_at: float = 0.0


# MLflow 3.17's SqlAlchemyStore.log_batch holds one pooled connection and opens a second
# one inside it (_log_params/_log_metrics each open their own session). When every
# connection of a worker's pool (5 + 10 overflow by default) is held by such a request, all
# of them wait for a second one: nothing moves until SQLAlchemy's 30 s pool timeout fails
# them ("QueuePool limit ... reached, connection timed out" = HTTP 400). A worker runs up to
# 40 requests at once (Starlette's WSGI thread pool), so a pool of more than 40 connections
# per worker cannot starve this way; PostgreSQL must then allow workers x pool + a margin.
BIG_POOL = {"pool_size": 20, "max_overflow": 30}
FULL = [
    # MLflow's defaults (pool 5 + 10 per worker) with 2 workers: the pool starves
    Scenario("48 trials, 2 workers, default pool", trials=48, reports=5, workers=2),
    # the fix: a pool above the 40 concurrent requests of a worker
    Scenario("48 trials, 2 workers, pool 20+30", trials=48, reports=5, workers=2,
             max_connections=150, **BIG_POOL),
    # that pool against a PostgreSQL whose max_connections is below workers x 50
    Scenario("64 trials, pool 20+30, max_connections=30", trials=64, reports=10,
             max_connections=30, **BIG_POOL),
    Scenario("64 trials, pool 20+30", trials=64, reports=10, max_connections=250, **BIG_POOL),
    Scenario("128 trials, pool 20+30", trials=128, reports=5, max_connections=250, **BIG_POOL),
    Scenario("256 trials, pool 20+30", trials=256, reports=3, max_connections=250, **BIG_POOL),
    # one worker: 32 concurrent clients on one pool of 15, the starvation is certain
    Scenario("32 trials, 1 worker, default pool", trials=32, reports=2, workers=1),
    Scenario("32 trials, 1 worker, pool 20+30", trials=32, reports=2, workers=1, **BIG_POOL),
]
SMOKE = [Scenario("smoke: 8 trials", trials=8, reports=5, workers=2, max_connections=40)]


# --------------------------------------------------------------------------- one trial


def _artifact_files(root: Path) -> dict[str, Path]:
    """PNG-like (PNG signature + random bytes) and JSON files of ARTIFACT_SIZES."""
    files = {}
    rng = random.Random(0)
    for rel, size in ARTIFACT_SIZES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.randbytes(size - 8))
        else:
            values = [rng.random() for _ in range(size // 20)]
            path.write_text(json.dumps({"per_donor": values})[:size])
        files[rel] = path
    return files


def _trial(index: int, url: str, exp_id: str, reports: int, files: dict[str, Path],
           go: Any, out: Any) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from hescape.tracking import is_transient_error, with_retry

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "View run" line per trial
    res = TrialResult(index, latencies=defaultdict(list))
    client = MlflowClient(url)

    def call(kind: str, fn: Any) -> Any:
        def transient(exc: BaseException) -> bool:
            res.retried[kind] += 1
            res.signatures[error_signature(f"{type(exc).__name__}: {exc}")] += 1
            if len(res.errors) < 3:
                res.errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:300]}")
            return is_transient_error(exc)

        t0 = time.perf_counter()
        try:
            return with_retry(fn, is_transient=transient)
        except Exception as exc:  # noqa: BLE001 - counted, reported
            res.failed[kind] += 1
            if len(res.errors) < 6:
                res.errors.append(f"FAILED {kind}: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        finally:
            res.latencies[kind].append(time.perf_counter() - t0)

    go.wait()
    tags = {"bench.trial": str(index), "mlflow.runName": f"trial-{index:03d}"}
    run = call("create_run", lambda: client.create_run(exp_id, tags=tags))
    if run is not None:
        rid = res.run_id = run.info.run_id
        params = [Param(f"p.{j:03d}", f"value-{index}-{j}") for j in range(N_PARAMS)]
        for start in range(0, N_PARAMS, 100):
            chunk = params[start:start + 100]
            call("log_params", lambda c=chunk: client.log_batch(rid, params=c))
        run_tags = [RunTag(f"t.{j:02d}", f"tag-{index}-{j}") for j in range(N_TAGS)]
        call("set_tags", lambda: client.log_batch(rid, tags=run_tags))
        rng = random.Random(index)
        for step in range(reports):
            ts = int(time.time() * 1000)
            batch = [Metric(f"val/m{k:02d}", rng.random(), ts, step) for k in range(N_KEYS)]
            call("log_metrics", lambda b=batch: client.log_batch(rid, metrics=b))
            res.sent_metrics += len(batch)
        for rel, path in files.items():
            folder = str(Path(rel).parent)
            call("log_artifact", lambda p=path, f=folder: client.log_artifact(rid, str(p), f))
        call("set_terminated", lambda: client.set_terminated(rid, "FINISHED"))
    res.finished_at = time.time()
    res.latencies = dict(res.latencies)
    out.put(res)


# --------------------------------------------------------------------------- counting


def _count(libpq_uri: str, exp_id: str) -> dict[str, Any]:
    """What arrived, straight from the database: per run params, tags, metric rows per key."""
    import psycopg2

    conn = psycopg2.connect(libpq_uri)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT r.run_uuid, r.status, t.value FROM runs r LEFT JOIN tags t "
                        "ON t.run_uuid = r.run_uuid AND t.key = 'bench.trial' "
                        "WHERE r.experiment_id = %s", (int(exp_id),))
            runs = {rid: {"status": status, "trial": trial} for rid, status, trial in cur}
            cur.execute("SELECT run_uuid, count(*) FROM params GROUP BY run_uuid")
            params = dict(cur.fetchall())
            cur.execute("SELECT run_uuid, count(*) FROM tags WHERE key LIKE 't.%%' "
                        "GROUP BY run_uuid")
            tags = dict(cur.fetchall())
            cur.execute("SELECT run_uuid, key, count(*), count(DISTINCT step) FROM metrics "
                        "GROUP BY run_uuid, key")
            metrics: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
            for rid, key, n, distinct in cur:
                metrics[rid][key] = (n, distinct)
    finally:
        conn.close()
    return {"runs": runs, "params": params, "tags": tags, "metrics": dict(metrics)}


def _audit(results: list[TrialResult], counted: dict[str, Any], artifacts_dir: Path,
           sc: Scenario) -> dict[str, Any]:
    """Sent vs arrived for every trial; the list of what is missing or extra."""
    problems: list[str] = []
    runs = counted["runs"]
    by_trial = Counter(info["trial"] for info in runs.values())
    sent = Counter()
    arrived = Counter()
    for res in results:
        sent["runs"] += 1
        sent["params"] += N_PARAMS
        sent["tags"] += N_TAGS
        sent["metric_values"] += N_KEYS * sc.reports
        sent["artifacts"] += len(ARTIFACT_SIZES)
        if by_trial[str(res.index)] != 1:
            problems.append(f"trial {res.index}: {by_trial[str(res.index)]} runs")
        rid = res.run_id
        if not rid or rid not in runs:
            problems.append(f"trial {res.index}: no run")
            continue
        arrived["runs"] += 1
        if runs[rid]["status"] != "FINISHED":
            problems.append(f"trial {res.index}: run {runs[rid]['status']}")
        arrived["params"] += counted["params"].get(rid, 0)
        arrived["tags"] += counted["tags"].get(rid, 0)
        metrics = counted["metrics"].get(rid, {})
        for k in range(N_KEYS):
            n, distinct = metrics.get(f"val/m{k:02d}", (0, 0))
            arrived["metric_values"] += n
            if n != sc.reports or distinct != sc.reports:
                problems.append(f"trial {res.index} val/m{k:02d}: history {n} rows, "
                                f"{distinct} steps (sent {sc.reports})")
        for rel, size in ARTIFACT_SIZES.items():
            hits = list(artifacts_dir.glob(f"*/{rid}/artifacts/{rel}"))
            if hits and hits[0].stat().st_size == size:
                arrived["artifacts"] += 1
            else:
                problems.append(f"trial {res.index}: artifact {rel} "
                                f"{'wrong size' if hits else 'missing'}")
        if counted["params"].get(rid, 0) != N_PARAMS:
            problems.append(f"trial {res.index}: {counted['params'].get(rid, 0)} params")
        if counted["tags"].get(rid, 0) != N_TAGS:
            problems.append(f"trial {res.index}: {counted['tags'].get(rid, 0)} tags")
    lost = {k: sent[k] - arrived[k] for k in sent}
    return {"sent": dict(sent), "arrived": dict(arrived), "lost": lost,
            "problems": problems[:30], "n_problems": len(problems)}


# --------------------------------------------------------------------------- one scenario


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"n": len(values), "p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99),
            "max_ms": round(1000 * ordered[-1], 1)}


SIGNATURES = {  # what a failed request said -> its name in the table
    "QueuePool limit": "SQLAlchemy pool exhausted (30 s pool timeout)",
    "too many clients": "PostgreSQL max_connections reached",
    "connection slots are reserved": "PostgreSQL max_connections reached",
    "deadlock detected": "deadlock",
    "Read timed out": "client read timeout",
    "too many 500 error responses": "HTTP 500 from the server",
    "too many 503 error responses": "HTTP 503 from the server",
    "Connection refused": "connection refused",
    "Connection aborted": "connection aborted",
}


SERVER_LOG_SIGNATURES = {  # what the server's own log says behind a 500/503
    "sorry, too many clients already": "PostgreSQL max_connections reached",
    "QueuePool limit": "SQLAlchemy pool exhausted",
    "deadlock detected": "deadlock",
}


def server_log_errors(log: str) -> dict[str, int]:
    return {name: log.count(text) for text, name in SERVER_LOG_SIGNATURES.items() if text in log}


def error_signature(message: str) -> str:
    """The name of a failed request's cause (``SIGNATURES``), else its first words."""
    for text, name in SIGNATURES.items():
        if text.lower() in message.lower():
            return name
    return " ".join(message.split()[:8])


def run_scenario(sc: Scenario, workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from mlflow.tracking import MlflowClient
    from pg import running_postgres

    from benchmarks.mlflow_server import MlflowServer

    workdir.mkdir(parents=True, exist_ok=True)
    files = _artifact_files(workdir / "files")
    with running_postgres(max_connections=sc.max_connections) as pg:
        server = MlflowServer(pg.uri, workdir / "artifacts", workers=sc.workers,
                              extra_env=sc.server_env(), log_path=workdir / "mlflow.log")
        with server:
            exp_id = MlflowClient(server.url).create_experiment(f"load-{time.time_ns()}")
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(sc.request_timeout)
            ctx = mp.get_context("fork")
            go, out = ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_trial, args=(i, server.url, exp_id, sc.reports, files,
                                                      go, out), daemon=True)
                     for i in range(sc.trials)]
            for p in procs:
                p.start()
            time.sleep(1.0)
            t0 = time.time()
            go.set()
            results: list[TrialResult] = []
            for _ in procs:
                results.append(out.get(timeout=1800))
            wall = max(r.finished_at for r in results) - t0
            for p in procs:
                p.join(timeout=30)
        # counted once the server has let go of its connections (max_connections may be
        # all taken by its pools)
        server_log = server_log_errors(server.log_path.read_text(errors="replace"))
        counted = _count(pg.libpq_uri, exp_id)
        audit = _audit(results, counted, workdir / "artifacts", sc)
    latencies: dict[str, list[float]] = defaultdict(list)
    retried, failed, signatures = Counter(), Counter(), Counter()
    errors: list[str] = []
    for res in results:
        for kind, vals in res.latencies.items():
            latencies[kind].extend(vals)
        retried.update(res.retried)
        failed.update(res.failed)
        signatures.update(res.signatures)
        errors.extend(res.errors)
    n_calls = sum(len(v) for v in latencies.values())
    return {
        "scenario": asdict(sc),
        "wall_s": round(wall, 1),
        "calls": n_calls,
        "calls_per_s": round(n_calls / wall, 1),
        "metric_values_per_s": round(sum(r.sent_metrics for r in results) / wall, 1),
        "latency": {kind: _percentiles(latencies[kind]) for kind in CALLS if latencies[kind]},
        "retried": dict(retried),
        "failed": dict(failed),
        "client_errors": sorted(set(errors))[:8],
        "error_causes": dict(signatures),
        "server_log": server_log,
        **audit,
    }


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | workers | PG max_conn | pool | wall s | calls/s | metric values/s "
            "| log_metrics p50/p95/p99 ms | create_run p95 ms | log_artifact p95 ms "
            "| retried | failed | lost (runs/params/tags/values/artifacts) | what the retried errors were |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        sc = r["scenario"]
        lat = r["latency"]
        lm = lat.get("log_metrics", {})
        pool = (f"{sc['pool_size'] or 5}+{sc['max_overflow'] or 10}"
                if sc["pool_size"] or sc["max_overflow"] else "5+10 (default)")
        lost = r["lost"]
        lost_s = "/".join(str(lost.get(k, 0)) for k in
                          ("runs", "params", "tags", "metric_values", "artifacts"))
        server = "; ".join(f"{k}: {v}" for k, v in r["error_causes"].items()) or "none"
        if r.get("server_log"):
            server += " (server log: " + "; ".join(
                f"{k} x{v}" for k, v in r["server_log"].items()) + ")"
        lines.append(
            f"| {sc['name']} | {sc['workers']} | {sc['max_connections']} | {pool} "
            f"| {r['wall_s']} | {r['calls_per_s']} | {r['metric_values_per_s']} "
            f"| {lm.get('p50_ms', '-')}/{lm.get('p95_ms', '-')}/{lm.get('p99_ms', '-')} "
            f"| {lat.get('create_run', {}).get('p95_ms', '-')} "
            f"| {lat.get('log_artifact', {}).get('p95_ms', '-')} "
            f"| {sum(r['retried'].values())} | {sum(r['failed'].values())} | {lost_s} "
            f"| {server} |")
    return head + "\n".join(lines) + "\n"


def _write(out: Path, name: str, info: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``<name>.json`` and ``<name>.md`` (the table with its command), after every scenario."""
    from hescape.atomic import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.json", json.dumps({**info, "scenarios": rows}, indent=2))
    write_text(out / f"{name}.md", f"`{info['command']}` ({info['machine']}, "
                                          f"{info['total_s']} s)\n\n" + markdown(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlflow_load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="8 trials, 5 reports")
    parser.add_argument("--only", type=int, nargs="*",
                        help="run only these scenario numbers (0-based) of the full list")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # `kill <pid>` (and a backgrounded run, where SIGINT is ignored) still stops the
    # server and PostgreSQL and removes the temp dir
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    scenarios = SMOKE if args.smoke else [s for i, s in enumerate(FULL)
                                          if args.only is None or i in args.only]
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    name = "mlflow_load_smoke" if args.smoke else "mlflow_load"
    info = {"machine": f"{os.cpu_count()} cores (shared)", "python": sys.version.split()[0],
            "command": "python -m benchmarks.mlflow_load" + (" --smoke" if args.smoke else "")}
    try:
        import mlflow

        info["mlflow"] = mlflow.__version__
    except ImportError:  # pragma: no cover
        pass
    with tempfile.TemporaryDirectory(prefix="mlflow-load-") as tmp:
        for i, sc in enumerate(scenarios):
            print(f"[{time.time() - t0:6.0f} s] {sc.name} ...", flush=True)
            row = run_scenario(sc, Path(tmp) / f"s{i}")
            rows.append(row)
            _write(args.out, name, {**info, "total_s": round(time.time() - t0, 1)}, rows)
            print(f"    {row['calls_per_s']} calls/s, {row['metric_values_per_s']} values/s, "
                  f"retried {sum(row['retried'].values())}, failed "
                  f"{sum(row['failed'].values())}, lost {row['lost']}, "
                  f"causes {row['error_causes']} server log {row.get('server_log')}", flush=True)
    _write(args.out, name, {**info, "total_s": round(time.time() - t0, 1)}, rows)
    print(markdown(rows))
    lost = sum(sum(v for v in r["lost"].values()) for r in rows)
    return 0 if lost == 0 or not args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["FULL", "SMOKE", "Scenario", "main", "markdown", "run_scenario"]
