"""Shared pieces of the benchmarks: the result row, timers, environment, memory readers.

Every benchmark module exposes ``run(smoke: bool, workdir: Path) -> list[Row]`` and can be
run on its own (``python -m benchmarks.<module> [--smoke]``). A :class:`Row` holds both
sides of one comparison measured in the same process run, the ratio in favour of this
project's path (> 1 = ours is better), and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the table: baseline vs ours, same run, same machine."""

    key: str
    title: str
    unit: str
    baseline: str
    baseline_value: float | None
    ours: str
    ours_value: float | None
    ratio: float | None
    target: str = ""
    command: str = ""
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def setup_env(threads: int | None = None) -> int:
    """Offline, headless, quiet; torch uses ``threads`` CPU threads (default: all cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    n = int(threads or os.environ.get("BENCH_THREADS") or (os.cpu_count() or 1))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass
    return n


def command(key: str, smoke: bool = False) -> str:
    """The command that reproduces benchmark ``key``."""
    return f"python benchmarks/run.py --only {key}" + (" --smoke" if smoke else "")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ratio(ours: float | None, baseline: float | None, *, higher_is_better: bool) -> float | None:
    """Ratio in favour of ours (> 1 = ours better); None when a side is missing."""
    if not ours or not baseline:
        return None
    return ours / baseline if higher_is_better else baseline / ours


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mem_available_gb() -> float:
    """MemAvailable of the machine (GiB), from /proc/meminfo (inf where unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("inf")


def smaps_rollup(pid: int) -> dict[str, float]:
    """Rss / Pss / Private / Shared memory of ``pid`` in MiB (``/proc/<pid>/smaps_rollup``)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) / 1024.0
    private = out.get("Private_Clean", 0.0) + out.get("Private_Dirty", 0.0)
    shared = out.get("Shared_Clean", 0.0) + out.get("Shared_Dirty", 0.0)
    return {"rss_mb": out.get("Rss", 0.0), "pss_mb": out.get("Pss", 0.0),
            "private_mb": private, "shared_mb": shared, "anon_mb": out.get("Anonymous", 0.0)}


@contextlib.contextmanager
def workdir(base: Path | None = None) -> Iterator[Path]:
    """A scratch directory removed afterwards."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="hescape-bench-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main_for(run: Callable[..., list[Row]], argv: list[str] | None = None) -> None:
    """``python -m benchmarks.<module> [--smoke] [--json PATH]``: run one benchmark module."""
    parser = argparse.ArgumentParser(description=(run.__module__ or "").split(".")[-1])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    setup_env(args.threads)
    with workdir() as wd:
        rows = run(smoke=args.smoke, workdir=wd)
    data = [r.to_dict() for r in rows]
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=str))
    else:
        json.dump(data, sys.stdout, indent=1, default=str)
        print()
