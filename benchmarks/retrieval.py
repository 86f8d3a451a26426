"""4. Whole-set retrieval: blocked ranks (``hescape.metrics.retrieval``) vs naive N x N argsort.

Each measurement runs in a fresh subprocess (``python -m benchmarks.retrieval --worker ...``)
so its peak memory is its own: ``tracemalloc`` peak (numpy reports its buffers to it) and
the process's peak RSS above the RSS before the computation. Both sides compute the
1-based rank of the true partner for every image query over all N gene candidates
(one direction). The naive side (``sims = q @ c.T``; ``argsort`` of every row) needs
~13 N^2 bytes (float32 sims + int64 order + a bool mask): it runs only where that fits
comfortably in the free memory of this shared machine; elsewhere its figure is computed
and marked infeasible.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, Row, command, main_for, mem_available_gb, ratio

KEY = "retrieval"
DIM = 128
NAIVE_BYTES_PER_CELL = 4 + 8 + 1  # float32 similarity + int64 argsort + bool match mask


def embeddings(n: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired float32 embeddings (gene = image + noise), so ranks are neither 1 nor random."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim), dtype=np.float32)
    gene = img + 4.0 * rng.standard_normal((n, dim), dtype=np.float32)
    return img, gene


def naive_ranks(query: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Rank of the true partner via the full N x N similarity and a per-row argsort."""
    from hescape.metrics.retrieval import l2_normalize

    q, c = l2_normalize(query), l2_normalize(cand)
    sims = q @ c.T
    np.negative(sims, out=sims)  # descending order without a second N x N copy
    order = np.argsort(sims, axis=1)
    del sims
    return np.argmax(order == np.arange(len(q))[:, None], axis=1) + 1


def worker(mode: str, n: int) -> dict[str, float]:
    """Run one side at size ``n`` in this process; time and peak memory."""
    import resource
    import tracemalloc

    from hescape.metrics.retrieval import rank_of_true

    img, gene = embeddings(n)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tracemalloc.start()
    t0 = time.perf_counter()
    ranks = naive_ranks(img, gene) if mode == "naive" else rank_of_true(img, gene)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"seconds": seconds, "tracemalloc_peak_mb": peak / 2**20,
            "rss_growth_mb": rss1 - rss0, "median_rank": float(np.median(ranks))}


@functools.cache
def measure(mode: str, n: int) -> dict[str, float]:
    """``worker(mode, n)`` in a fresh subprocess (once per run for each (mode, n))."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.retrieval", "--worker", mode, str(n)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def naive_feasible(n: int, margin: float = 2.0) -> bool:
    """True when ``margin`` x the naive path's memory fits in MemAvailable (minus 2 GiB)."""
    need_gb = NAIVE_BYTES_PER_CELL * n * n / 2**30
    return need_gb * margin < mem_available_gb() - 2.0


def row_for(n: int, smoke: bool) -> Row:
    """Blocked at ``n``; naive at ``n`` when it fits, else at the largest size that does."""
    blocked = measure("blocked", n)
    naive_n = next((m for m in (n, 20_000, 10_000, 5_000, 2_000) if m <= n and naive_feasible(m)),
                   None)
    naive = measure("naive", naive_n) if naive_n else None
    need_gb = NAIVE_BYTES_PER_CELL * n * n / 2**30
    details = {"n": n, "dim": DIM, "blocked": blocked, "naive_n": naive_n, "naive": naive,
               "naive_memory_needed_gb_at_n": need_gb}
    if naive is not None and naive_n == n:
        notes = "measured side by side"
        t_ratio = ratio(blocked["seconds"], naive["seconds"], higher_is_better=False)
        m_ratio = ratio(blocked["tracemalloc_peak_mb"], naive["tracemalloc_peak_mb"],
                        higher_is_better=False)
        naive_s, naive_mb = naive["seconds"], naive["tracemalloc_peak_mb"]
    else:
        notes = (f"naive NOT run at N={n}: needs ~{need_gb:.0f} GiB (13 N^2 bytes), infeasible "
                 "here; memory is computed, naive time extrapolated as N^2 log N from "
                 f"N={naive_n} (measured: {naive['seconds']:.1f} s)" if naive else
                 f"naive NOT run: needs ~{need_gb:.0f} GiB")
        naive_mb = need_gb * 1024
        naive_s = (naive["seconds"] * (n / naive_n) ** 2 * np.log(n) / np.log(naive_n)
                   if naive else None)
        t_ratio = ratio(blocked["seconds"], naive_s, higher_is_better=False)
        m_ratio = ratio(blocked["tracemalloc_peak_mb"], naive_mb, higher_is_better=False)
    details.update({"time_ratio": t_ratio, "memory_ratio": m_ratio})
    return Row(
        key=KEY, title=f"Retrieval ranks, N={n:,}", unit="s (memory in notes)",
        baseline="naive N x N sim + argsort", baseline_value=naive_s,
        ours="blocked (block 1024)", ours_value=blocked["seconds"], ratio=t_ratio,
        target=">= 10x (time or memory)", command=command(KEY, smoke),
        notes=(f"time {t_ratio:.1f}x, peak memory {m_ratio:.0f}x "
               f"({blocked['tracemalloc_peak_mb']:.0f} vs {naive_mb:.0f} MiB); " + notes),
        details=details)


def run(smoke: bool, workdir: Path) -> list[Row]:
    """Rows at N = 20k and 100k (smoke: 2k)."""
    return [row_for(n, smoke) for n in ((2_000,) if smoke else (20_000, 100_000))]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main_for(run)
