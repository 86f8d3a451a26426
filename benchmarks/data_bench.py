"""Patch-store and simulator benchmark (not a test): prints numbers side by side.

    .venv/bin/python benchmarks/data_bench.py [--n 4000] [--size 128] [--reads 2000]

Random access = batches of random rows (like a shuffled DataLoader). Stores compared:
memmapped .npy (the canonical store), zarr (row chunks, if zarr is installed) and reading
the whole array into memory first (np.load) then indexing. Warm page cache: the numbers
are upper bounds for local disk; on network storage the memmap advantage grows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from hescape.config import SimulateConfig
from hescape.data import simulate


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_simulator() -> None:
    print("simulator (write incl. fingerprint), patches/s")
    for donors, spots, size in [(6, 1000, 64), (2, 500, 224)]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SimulateConfig(n_donors=donors, spots_per_donor=spots, patch_size=size)
            t = _timed(lambda cfg=cfg, tmp=tmp: simulate(Path(tmp) / "ds", cfg, progress=False,
                                                         overwrite=True), repeat=1)
        n = donors * spots
        print(f"  {donors} donors x {spots} spots @ {size:>3} px: {t:6.2f} s "
              f"({n / t:8.0f} patches/s)")


def _zarr_store(arr: np.ndarray, path: Path):
    try:
        import zarr
    except ImportError:
        return None
    z = zarr.open_array(str(path), mode="w", shape=arr.shape, dtype=arr.dtype,
                        chunks=(1, *arr.shape[1:]))
    z[:] = arr
    return zarr.open_array(str(path), mode="r")


def bench_reads(n: int, size: int, reads: int, batch: int = 64) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arr = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        np.save(tmp / "p.npy", arr)
        zarr_arr = _zarr_store(arr, tmp / "p.zarr")
        del arr
        idx = [np.sort(rng.choice(n, batch, replace=False)) for _ in range(reads // batch)]
        mm = np.load(tmp / "p.npy", mmap_mode="r")
        row_mb = size * size * 3 / 2**20
        results = {"memmap .npy": _timed(lambda: [np.asarray(mm[i]) for i in idx])}
        if zarr_arr is not None:
            results["zarr (row chunks)"] = _timed(
                lambda: [zarr_arr.get_orthogonal_selection((i,)) for i in idx], repeat=1)
        full_open = _timed(lambda: np.load(tmp / "p.npy"), repeat=1)
        full = np.load(tmp / "p.npy")
        results["np.load whole + index"] = full_open + _timed(lambda: [full[i] for i in idx])
        print(f"random reads: {len(idx)} batches x {batch} rows of {size}x{size}x3 "
              f"from {n} rows ({n * row_mb:.0f} MiB)")
        base = results["memmap .npy"]
        for name, t in results.items():
            rows = len(idx) * batch
            print(f"  {name:<24} {rows / t:10.0f} rows/s  {rows * row_mb / t:8.0f} MiB/s  "
                  f"x{t / base:6.2f} time of memmap")
        print(f"  (np.load of the whole array alone: {full_open:.2f} s; memmap open: "
              f"{_timed(lambda: np.load(tmp / 'p.npy', mmap_mode='r')) * 1e3:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="rows in the store")
    parser.add_argument("--size", type=int, default=128, help="patch side in px")
    parser.add_argument("--reads", type=int, default=2048, help="rows read at random")
    parser.add_argument("--skip-simulator", action="store_true")
    args = parser.parse_args()
    bench_reads(args.n, args.size, args.reads)
    if not args.skip_simulator:
        bench_simulator()


if __name__ == "__main__":
    main()
