"""Panel scaling: time and peak memory of every stage of one trial's pipeline vs panel size.

For each size N (``--sizes 10k,50k,200k``; 16 donors, 380 genes, 64 px patches: the
``scale-*`` simulator presets) every stage runs alone in a fresh process
(``benchmarks/panel_stages.py``): simulate, validate (``load_paired``), each preprocessing
variant (none, pca, harmony inductive, scvi/drvi at their default epochs, combat), the frozen
feature cache (demo encoder: EfficientNet-Lite0 at 64 px), one head-only trial (feature
cache, ``--steps`` steps), the trial's evaluation as a study trial runs it (``trial_eval``:
every per-trial probe; the study's baselines and UMAPs are computed once per study, not per
trial) and the full stand-alone evaluation of ``hescape evaluate`` (``evaluate``: + baselines,
plots). A trial's marginal cost in a study is ``trial`` + ``trial_eval``. Per stage: wall seconds, seconds of the work itself
(imports excluded), peak RSS (``wait4`` ru_maxrss), sampled peak anonymous / file-backed RSS,
and RSS growth over the process's start. Between sizes: the growth exponents
time ~ N^a and memory ~ N^b. Not a timed test: nothing asserts a speed.

    python -m benchmarks.panel_scaling --sizes 2k,5k          # quick (minutes)
    python -m benchmarks.panel_scaling --sizes 10k,50k        # results merge into the JSON
    python -m benchmarks.panel_scaling --sizes 200k --stages features,trial

Results merge into ``benchmarks/results/panel_scaling.json`` (per size and stage) and the
table into ``panel_scaling.md``. A stage is skipped (and says why) when linear
extrapolation from the largest smaller size measured says it would not fit in the memory
available now, and killed if its RSS passes ``--max-rss-gib``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.panel_stages import METHOD, REPO, STAGES
from benchmarks.panel_table import size_pairs

RESULTS = REPO / "benchmarks" / "results"
GIB = 2**30


def parse_sizes(text: str) -> list[int]:
    """'2k,50k,200000' -> [2000, 50000, 200000] (sorted, unique)."""
    out = set()
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        mult = 1000 if part.endswith("k") else 1
        try:
            out.add(int(float(part.rstrip("k")) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes: {part!r} is not a number "
                                             "(e.g. 10k,50k)") from None
    return sorted(out)


def mem_available() -> float:
    """MemAvailable in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024.0
    return float("inf")


class Sampler(threading.Thread):
    """Polls a process's VmRSS / RssAnon / RssFile; kills it above ``cap`` bytes."""

    def __init__(self, pid: int, cap: float, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.cap, self.period = pid, cap, period
        self.peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        self.killed = False
        self.done = threading.Event()

    def run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while not self.done.is_set():
            try:
                for line in path.read_text().splitlines():
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024.0)
            except OSError:
                return
            if self.peak["VmRSS"] > self.cap and not self.killed:
                self.killed = True
                os.kill(self.pid, 9)
            self.done.wait(self.period)


def clear_outputs(stage: str, wd: Path) -> None:
    """Remove what ``stage`` wrote before, so it computes rather than hits a cache."""
    cache = wd / "runs" / "cache"
    if stage in METHOD:
        for f in (cache / "preprocess").glob(f"expr-{METHOD[stage]}-*"):
            f.unlink()
    targets = {"features": [cache / "features"], "trial": [wd / "trial"],
               "evaluate": [wd / "eval"], "trial_eval": [wd / "trial_eval"],
               "simulate": [wd / "data"]}.get(stage, [])
    for t in targets:
        shutil.rmtree(t, ignore_errors=True)
    (wd / "stages" / f"{stage}.json").unlink(missing_ok=True)


def run_stage(stage: str, size: int, wd: Path, *, steps: int, cap: float, timeout: float,
              sets: list[str]) -> dict[str, Any]:
    """Run one stage in a fresh process; wall time, rusage peak, sampled RSS split."""
    clear_outputs(stage, wd)
    log = wd / "logs" / f"{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.panel_stages", stage, "--workdir", str(wd),
           "--size", str(size), "--steps", str(steps), *(f"--set={kv}" for kv in sets)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid, cap)
    sampler.start()
    timer = threading.Timer(timeout, lambda: os.kill(proc.pid, 9))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: never leave the stage running
        proc.kill()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    sampler.done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0,
                           "peak_anon_mib": sampler.peak["RssAnon"] / 2**20,
                           "peak_file_mib": sampler.peak["RssFile"] / 2**20,
                           "returncode": proc.returncode}
    out = wd / "stages" / f"{stage}.json"
    if proc.returncode == 0 and out.is_file():
        child = json.loads(out.read_text())
        row.update(work_s=child["work_s"], rss_before_mib=child["rss_before_mib"],
                   info=child["info"])
        row["rss_growth_mib"] = max(0.0, row["peak_rss_mib"] - child["rss_before_mib"])
    else:
        why = (f"killed: RSS above {cap / GIB:.1f} GiB" if sampler.killed else
               f"killed after {timeout:.0f} s" if wall >= timeout else
               f"exit {proc.returncode}")
        row["error"] = f"{why}; log {log}: " + log.read_text()[-1500:]
    return row


def exponent(n1: int, v1: float | None, n2: int, v2: float | None) -> float | None:
    """b in v ~ N^b between two sizes (None where a value is missing or not positive)."""
    if not v1 or not v2 or v1 <= 0 or v2 <= 0 or n1 == n2:
        return None
    return math.log(v2 / v1) / math.log(n2 / n1)


def exponents(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per stage, between consecutive measured sizes: time (work), peak RSS, RSS growth."""
    out: dict[str, list[dict[str, Any]]] = {}
    for stage in STAGES:
        sizes = sorted(int(n) for n, r in results.items() if "work_s" in r.get(stage, {}))
        pairs = []
        for n1, n2 in size_pairs(sizes):
            a, b = results[str(n1)][stage], results[str(n2)][stage]
            pairs.append({"from": n1, "to": n2,
                          "time": exponent(n1, a["work_s"], n2, b["work_s"]),
                          "rss": exponent(n1, a["peak_rss_mib"], n2, b["peak_rss_mib"]),
                          "rss_growth": exponent(n1, a["rss_growth_mib"], n2,
                                                 b["rss_growth_mib"])})
        if pairs:
            out[stage] = pairs
    return out


def _need_bytes(results: dict[str, Any], stage: str, size: int) -> float | None:
    """Peak RSS of ``stage`` at ``size`` by linear extrapolation from the largest smaller size."""
    smaller = [int(n) for n, r in results.items()
               if int(n) < size and "peak_rss_mib" in r.get(stage, {}) and "error" not in r[stage]]
    if not smaller:
        return None
    n = max(smaller)
    return results[str(n)][stage]["peak_rss_mib"] * 2**20 * size / n


def run_size(size: int, args: argparse.Namespace, results: dict[str, Any],
             save: Callable[[], None] = lambda: None) -> None:
    """Every requested stage at ``size``, in order, recorded into ``results[str(size)]``;
    ``save()`` after each (a long run keeps what it measured)."""
    wd = (args.workdir / str(size)).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    here = results.setdefault(str(size), {})
    for stage in args.stages:
        avail = mem_available()
        need = _need_bytes(results, stage, size)
        if need is not None and need + GIB > avail:
            here[stage] = {"skipped": f"needs ~{need / GIB:.1f} GiB (linear from a smaller "
                           f"size), {avail / GIB:.1f} GiB available now"}
            print(f"N={size:>7,d} {stage:12s} skipped: {here[stage]['skipped']}", flush=True)
            continue
        cap = min(args.max_rss_gib * GIB, avail - 0.5 * GIB)
        row = run_stage(stage, size, wd, steps=args.steps, cap=cap, timeout=args.timeout,
                        sets=args.sets)
        row["mem_available_gib_at_start"] = avail / GIB
        row["load_avg_at_start"] = os.getloadavg()[0]
        row["overrides"] = args.sets
        here[stage] = row
        print(format_row(size, stage, row), flush=True)
        save()
        if "error" in row and args.stop_on_error:
            raise SystemExit(f"N={size} {stage} failed: {row['error']}")


def format_row(size: int, stage: str, row: dict[str, Any]) -> str:
    if "work_s" not in row:
        return f"N={size:>7,d} {stage:12s} FAILED {row.get('error', '')[:300]}"
    return (f"N={size:>7,d} {stage:12s} work {row['work_s']:8.1f} s  wall {row['wall_s']:8.1f} s"
            f"  peak RSS {row['peak_rss_mib']:8.0f} MiB (anon {row['peak_anon_mib']:6.0f}, "
            f"file {row['peak_file_mib']:6.0f}, growth {row['rss_growth_mib']:6.0f})")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "mem_total_gib": _meminfo("MemTotal") / GIB,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg": os.getloadavg()}


def _meminfo(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024.0
    return float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("10k,50k,200k"),
                   help="panel sizes in spots, e.g. 2k,5k (default 10k,50k,200k)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--steps", type=int, default=300, help="training steps of the trial (300)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hescape-panel-scaling"),
                   help="where each size's dataset and caches live (kept for re-runs)")
    p.add_argument("--out", type=Path, default=RESULTS / "panel_scaling.json",
                   help="results JSON (merged with an existing one); .md written beside it")
    p.add_argument("--max-rss-gib", type=float, default=20.0, help="kill a stage above this")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per stage")
    p.add_argument("--stop-on-error", action="store_true")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="merge these runs' results into --out (runs nothing)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="study config override for every stage (recorded in the results), "
                        "e.g. preprocess.expression.scvi.max_epochs=2 for a smoke run "
                        "(drvi.max_epochs likewise)")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in args.stages]  # pipeline order
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.panel_table import write_outputs

    args = parse_args(argv)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = data.get("results", {})
    if args.merge:  # no stage runs: fold other runs' results in (later files win per stage)
        for path in args.merge:
            for size, rows in json.loads(Path(path).read_text())["results"].items():
                results.setdefault(size, {}).update(rows)
        write_outputs(args.out, results, exponents(results), machine())
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> run_stage kills its child
    def save() -> None:
        write_outputs(args.out, results, exponents(results), machine(), quiet=True)

    for size in args.sizes:
        run_size(size, args, results, save)
        write_outputs(args.out, results, exponents(results), machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
