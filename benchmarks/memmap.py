"""Memory: two worker processes reading one patch store, memmapped vs loaded whole.

A canonical ``patches.npy`` (uint8 N x 32 x 32 x 3; default N = 100k = 293 MiB) is read in
full by 2 concurrent processes, once with ``np.load(mmap_mode="r")`` (what ``load_paired``
does) and once with a plain ``np.load`` (a copy per worker). While both are alive their
``/proc/<pid>/smaps_rollup`` is read: PSS (shared pages split between the sharers) and
private memory. Memmapped, the store lives once in the page cache, whatever the number of
workers; loaded, every worker holds its own copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, Row, command, main_for, smaps_rollup

KEY = "memmap"
PROCS = 2


def write_store(path: Path, n: int, size: int = 32, chunk: int = 8192) -> Path:
    """Write a random uint8 patch store of ``n`` rows in chunks (never whole in memory)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        arr[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), dtype=np.uint8)
    arr.flush()
    del arr
    return path


def reader(path: str, mode: str) -> None:
    """Child: read every row (as training would over an epoch), report, wait for the parent."""
    arr = np.load(path, mmap_mode="r") if mode == "memmap" else np.load(path)
    total = 0
    for start in range(0, len(arr), 4096):
        total += int(arr[start:start + 4096, 0, 0, 0].sum()) + int(arr[start:start + 4096].max())
    print(json.dumps({"checksum": total}), flush=True)
    sys.stdin.read()  # stay alive until the parent has measured


def measure(path: Path, mode: str) -> list[dict[str, float]]:
    """Start ``PROCS`` readers, read their memory while all are alive, stop them."""
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.memmap", "--reader", str(path),
                               mode], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(PROCS)]
    try:
        for p in procs:
            p.stdout.readline()
        return [smaps_rollup(p.pid) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)


def run(smoke: bool, workdir: Path) -> list[Row]:
    """PSS / private memory of 2 readers, memmapped vs np.load."""
    n = 5_000 if smoke else 100_000
    path = write_store(workdir / "patches.npy", n)
    store_mb = path.stat().st_size / 2**20
    mm, full = measure(path, "memmap"), measure(path, "load")
    pss_mm, pss_full = sum(m["pss_mb"] for m in mm), sum(m["pss_mb"] for m in full)
    priv_mm, priv_full = sum(m["private_mb"] for m in mm), sum(m["private_mb"] for m in full)
    return [Row(
        key=KEY, title=f"Patch store in {PROCS} workers, N={n:,}", unit="MiB (PSS, 2 procs)",
        baseline="np.load per worker", baseline_value=pss_full, ours="memmap (load_paired)",
        ours_value=pss_mm, ratio=pss_full / pss_mm if pss_mm else None,
        target="store held once, not per worker", command=command(KEY, smoke),
        notes=(f"store {store_mb:.0f} MiB; private memory {priv_mm:.0f} vs {priv_full:.0f} MiB "
               "(incl. ~" f"{min(m['private_mb'] for m in mm):.0f} MiB of Python+numpy per "
               "process); PSS counts shared pages once across processes"),
        details={"n": n, "store_mb": store_mb, "memmap": mm, "load": full},
    )]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--reader":
        reader(sys.argv[2], sys.argv[3])
    else:
        main_for(run)
