"""Performance harness: one table of ratios, each measured side by side in this run.

    python benchmarks/run.py                 # full size (~15-25 min on 2 CPU cores)
    python benchmarks/run.py --smoke         # tiny sizes, proves every benchmark works (CI)
    python benchmarks/run.py --only retrieval,memmap

Each benchmark lives in its own module (``benchmarks/<module>.py``, runnable alone with
``python -m benchmarks.<module>``). Results: ``benchmarks/results/latest.{json,md}``
(``smoke.{json,md}`` with ``--smoke``). A benchmark that fails is recorded with its error
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import Row, command, setup_env, workdir  # noqa: E402
from benchmarks.report import machine, markdown_table  # noqa: E402

# key -> module; the order they run in (the Ray ones last, sharing one ray.init)
BENCHMARKS = {
    "frozen_cache": "benchmarks.frozen_cache",
    "preprocess": "benchmarks.shared_preprocess",
    "retrieval": "benchmarks.retrieval",
    "data_loading": "benchmarks.data_loading",
    "memmap": "benchmarks.memmap",
    "eval_cost": "benchmarks.eval_cost",
    "trial_memory": "benchmarks.trial_memory",
    "overhead": "benchmarks.trial_overhead",
    "scaling": "benchmarks.scaling",
    "vectorised": "benchmarks.vectorised_trials",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds each)")
    parser.add_argument("--only", default="", help=f"comma list of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()] or list(BENCHMARKS)
    unknown = [k for k in keys if k not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    args.keys = keys
    return args


def run_one(key: str, smoke: bool, scratch: Path) -> tuple[list[Row], float]:
    """Run benchmark ``key``; a failure becomes a row carrying the error."""
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(BENCHMARKS[key])
        sub = scratch / key
        sub.mkdir()
        rows = module.run(smoke=smoke, workdir=sub)
    except Exception as exc:  # noqa: BLE001 - record and go on with the other benchmarks
        traceback.print_exc()
        rows = [Row(key=key, title=key, unit="", baseline="", baseline_value=None, ours="",
                    ours_value=None, ratio=None, command=command(key, smoke),
                    notes=f"FAILED: {type(exc).__name__}: {exc}"[:500],
                    details={"error": traceback.format_exc()[-4000:]})]
    return rows, time.perf_counter() - t0


def merge(path: Path, info: dict, seconds: dict[str, float],
          results: dict[str, list[dict]]) -> dict:
    """Results of this run over those already in ``path`` (a ``--only`` run updates its keys)."""
    old: dict = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
    runs = [r for r in old.get("runs", []) if set(r["keys"]) - set(results)]
    for r in runs:
        r["keys"] = [k for k in r["keys"] if k not in results]
    runs.append({**info, "keys": list(results), "seconds": seconds})
    merged = {k: v for k, v in old.get("benchmarks", {}).items() if k not in results}
    merged.update(results)
    return {"machine": info, "runs": runs, "benchmarks": merged}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = setup_env(args.threads)
    out_dir = args.out or REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "latest"
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    started = dt.datetime.now(dt.timezone.utc)
    with workdir() as scratch:
        for key in args.keys:
            print(f"[bench] {key} ...", file=sys.stderr, flush=True)
            got, seconds[key] = run_one(key, args.smoke, scratch)
            rows.extend(got)
            print(f"[bench] {key} done in {seconds[key]:.1f} s", file=sys.stderr, flush=True)
    info = {**machine(), "torch_threads": threads, "smoke": args.smoke,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/run.py" + (" --smoke" if args.smoke else "")
            + (f" --only {args.only}" if args.only else "")}
    print(markdown_table(rows, info))
    payload = merge(out_dir / f"{stem}.json", info, seconds,
                    {k: [r.to_dict() for r in rows if r.key == k] for k in args.keys})
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    merged = [Row(**r) for k in BENCHMARKS for r in payload["benchmarks"].get(k, [])]
    (out_dir / f"{stem}.md").write_text(markdown_table(merged, info, payload["runs"]) + "\n")
    print(f"[bench] wrote {out_dir / stem}.json and .md", file=sys.stderr)
    failed = [r.key for r in rows if r.notes.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
