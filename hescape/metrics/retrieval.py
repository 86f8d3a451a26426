"""Cross-modal retrieval over a whole held-out set, computed in blocks.

Row ``i`` of the query matrix is paired with row ``i`` of the candidate matrix (the true
match). Similarity is the dot product of L2-normalised embeddings (cosine). Memory grows
with ``N x block_size``; there is never an ``N x N`` matrix or argsort.

Ties count against the query: the rank of the true match is
``#{j : s_ij >= s_ii}`` (1-based, the true match itself included), so a degenerate
embedding (all rows identical) gets rank ``N``, never a flattering rank 1. ``topk_blocked``
breaks ties by the lower candidate index, deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Return float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-d (N x D), got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, eps)


def _check_pair(query: np.ndarray, cand: np.ndarray) -> None:
    if query.shape[1] != cand.shape[1]:
        raise ValueError(
            f"query and candidate dimensions differ: {query.shape[1]} vs {cand.shape[1]}"
        )


def _check_block(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def topk_blocked(
    query: np.ndarray, cand: np.ndarray, k: int, block_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` candidates per query by cosine similarity, in query blocks.

    Returns ``(indices, scores)``, each ``Q x k``, best first; ties go to the lower index.
    """
    _check_block(block_size)
    q, c = l2_normalize(query), l2_normalize(cand)
    _check_pair(q, c)
    k = min(int(k), c.shape[0])
    if k < 1:
        raise ValueError("k must be >= 1 and there must be at least one candidate")
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)
    score_out = np.empty((q.shape[0], k), dtype=np.float32)
    for start in range(0, q.shape[0], block_size):
        sims = q[start : start + block_size] @ c.T
        for row, s in enumerate(sims):
            # candidates strictly above the k-th best score, plus ties at it (lowest index first)
            kth = np.partition(s, -k)[-k]
            pool = np.flatnonzero(s >= kth)
            order = np.lexsort((pool, -s[pool]))[:k]
            idx_out[start + row] = pool[order]
            score_out[start + row] = s[pool[order]]
    return idx_out, score_out


def rank_of_true(query: np.ndarray, cand: np.ndarray, block_size: int = 1024) -> np.ndarray:
    """1-based rank of ``cand[i]`` for ``query[i]``; ties count against (see module doc)."""
    _check_block(block_size)
    q, c = l2_normalize(query), l2_normalize(cand)
    _check_pair(q, c)
    if q.shape[0] != c.shape[0]:
        raise ValueError(f"paired retrieval needs equal rows: {q.shape[0]} vs {c.shape[0]}")
    ranks = np.empty(q.shape[0], dtype=np.int64)
    for start in range(0, q.shape[0], block_size):
        stop = min(start + block_size, q.shape[0])
        sims = q[start:stop] @ c.T
        true = sims[np.arange(stop - start), np.arange(start, stop)]
        ranks[start:stop] = (sims >= true[:, None]).sum(axis=1)
    return ranks


def retrieval_ranks(
    img: np.ndarray, gene: np.ndarray, block_size: int = 1024
) -> dict[str, np.ndarray]:
    """Whole-set ranks of the true partner in both directions: ``img2gene``, ``gene2img``."""
    return {
        "img2gene": rank_of_true(img, gene, block_size),
        "gene2img": rank_of_true(gene, img, block_size),
    }


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose true match ranks within the top ``k``."""
    return float(np.mean(np.asarray(ranks) <= k)) if len(ranks) else float("nan")


def _summarize(ranks: dict[str, np.ndarray], ks: Sequence[int], suffix: str = "") -> dict:
    out: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            out[f"r{k}_{direction}{suffix}"] = recall_at(r, k)
        out[f"mean_rank_{direction}{suffix}"] = float(np.mean(r))
        out[f"median_rank_{direction}{suffix}"] = float(np.median(r))
    return out


def _within_donor(
    img: np.ndarray, gene: np.ndarray, donors: np.ndarray, ks: Sequence[int], block_size: int
) -> dict[str, float]:
    """Ranks with candidates restricted to the query's donor, pooled over all queries."""
    pooled: dict[str, list[np.ndarray]] = {"img2gene": [], "gene2img": []}
    for donor in np.unique(donors):
        rows = np.flatnonzero(donors == donor)
        for direction, r in retrieval_ranks(img[rows], gene[rows], block_size).items():
            pooled[direction].append(r)
    ranks = {d: np.concatenate(r) for d, r in pooled.items()}
    out = _summarize(ranks, ks, suffix="_within_donor")
    return {k: v for k, v in out.items() if not k.startswith("median_rank")}


def _in_batch(
    img: np.ndarray, gene: np.ndarray, ks: Sequence[int], size: int, repeats: int, seed: int
) -> dict[str, float]:
    """HESCAPE-style Recall@k inside random batches of ``size`` (seeded), averaged."""
    n = img.shape[0]
    size_eff = min(size, n)
    rng = np.random.default_rng(seed)
    hits: dict[str, list[np.ndarray]] = {"img2gene": [], "gene2img": []}
    for _ in range(repeats):
        perm = rng.permutation(n)
        for start in range(0, n - size_eff + 1, size_eff):  # full batches only
            rows = perm[start : start + size_eff]
            for direction, r in retrieval_ranks(img[rows], gene[rows], size_eff).items():
                hits[direction].append(r)
    out: dict[str, float] = {}
    for direction, parts in hits.items():
        r = np.concatenate(parts)
        for k in ks:
            out[f"inbatch{size_eff}_r{k}_{direction}"] = recall_at(r, k)
    return out


def cross_modal_retrieval(
    img: np.ndarray,
    gene: np.ndarray,
    *,
    donors: np.ndarray | Sequence | None = None,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
    inbatch_size: int = 64,
    inbatch_repeats: int = 20,
    seed: int = 0,
    precomputed_ranks: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Image<->gene retrieval metrics over the whole set, within donor and in-batch.

    Keys: ``r{k}_img2gene``, ``r{k}_gene2img``, ``mean_rank_*``, ``median_rank_*``,
    ``r{k}_*_within_donor``, ``mean_rank_*_within_donor`` (only with ``donors``),
    ``inbatch{B}_r{k}_*`` (HESCAPE-comparable; NOT comparable with the whole-set figure;
    ``B = min(inbatch_size, N)``, so the key always names the real batch size) and
    ``retrieval_n``. ``precomputed_ranks`` reuses ``retrieval_ranks`` output.
    """
    img, gene = l2_normalize(img), l2_normalize(gene)
    if img.shape != gene.shape:
        raise ValueError(
            f"img and gene embeddings must have equal shapes: {img.shape} vs {gene.shape}"
        )
    if img.shape[0] < 2:
        raise ValueError(f"retrieval needs at least 2 pairs, got {img.shape[0]}")
    ks = sorted({int(k) for k in ks})
    ranks = precomputed_ranks or retrieval_ranks(img, gene, block_size)
    out = _summarize(ranks, ks)
    if donors is not None:
        donors = np.asarray(donors)
        if donors.shape[0] != img.shape[0]:
            raise ValueError(f"donors has {donors.shape[0]} entries for {img.shape[0]} pairs")
        out.update(_within_donor(img, gene, donors, ks, block_size))
    out.update(_in_batch(img, gene, ks, inbatch_size, inbatch_repeats, seed))
    out["retrieval_n"] = float(img.shape[0])
    return out


def fixed_gallery_retrieval(
    img: np.ndarray,
    gene: np.ndarray,
    *,
    size: int = 1000,
    draws: int = 5,
    ks: Sequence[int] = (1, 5, 10),
    seed: int = 0,
    block_size: int = 1024,
) -> dict[str, float]:
    """Recall@k and mean rank with a gallery of exactly ``size`` held-out pairs.

    Each of ``draws`` seeded draws samples ``size`` pairs without replacement and ranks every
    query against that gallery only; figures are averaged over draws, so they compare
    across datasets of different sizes (a whole-set Recall@k falls as the set grows). Keys
    ``r{k}_{img2gene,gene2img}_gallery{size}``, ``mean_rank_*_gallery{size}``. Raises
    ValueError when there are fewer than ``size`` pairs.
    """
    n = len(img)
    if n < size:
        raise ValueError(f"fixed-gallery retrieval needs {size} held-out pairs, there are {n} "
                         "(eval.fixed_gallery)")  # fmt: skip
    rng = np.random.default_rng(seed)
    sums: dict[str, float] = {}
    for _ in range(draws):
        rows = np.sort(rng.choice(n, size, replace=False))
        ranks = retrieval_ranks(img[rows], gene[rows], block_size)
        for key, value in _summarize(ranks, ks, suffix=f"_gallery{size}").items():
            if not key.startswith("median_rank"):
                sums[key] = sums.get(key, 0.0) + value
    return {k: v / draws for k, v in sums.items()}


def recall_by_donor(
    ranks: dict[str, np.ndarray], donors: np.ndarray | Sequence, ks: Sequence[int]
) -> list[tuple[str, str, float, int]]:
    """Per query donor: Recall@k of whole-set ``ranks`` -> rows ``(metric, donor, value, n)``
    with metric ``r{k}_{direction}`` (the gallery stays the whole held-out set)."""
    donors = np.asarray(donors)
    rows = []
    for direction, r in ranks.items():
        for donor in np.unique(donors):
            mask = donors == donor
            for k in sorted(set(ks)):
                rows.append((f"r{k}_{direction}", str(donor), recall_at(r[mask], k),
                             int(mask.sum())))  # fmt: skip
    return rows
