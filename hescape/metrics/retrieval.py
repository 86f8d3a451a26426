"""Cross-modal retrieval over a whole held-out set, computed in blocks.

Row ``i`` of the query matrix is paired with row ``i`` of the candidate matrix (the true
match). Similarity is the dot product of L2-normalised embeddings (cosine). Memory grows
with ``N x block_size``; there is never an ``N x N`` matrix or argsort.

Ties count against the query: the rank of the true match is
``#{j : s_ij >= s_ii}`` (1-based, the true match itself included), so a degenerate
embedding (all rows identical) gets rank ``N``, never a flattering rank 1. ``topk_blocked``
breaks ties by the lower candidate index, deterministically.

The products run in numpy here (on CPU numpy's BLAS beat torch's: ``benchmarks/
eval_profile.py``). An ``engine`` (:class:`SimilarityEngine`, e.g. the torch one in
``hescape.evaluate.similarity`` on a GPU) takes over the whole-set products: it gets the
normalised matrices and returns what the numpy path returns, by the same rules; its
similarities are the device's float32 products (no reduced-precision matmul), so a figure
can differ from the CPU one only where two similarities tie to within float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class SimilarityEngine(Protocol):
    """Whole-set similarity products somewhere else than numpy (inputs: L2-normalised
    float32 rows; outputs as ``top_k_rows`` / ``retrieval_ranks`` define them)."""

    def top_k(self, query: np.ndarray, cand: np.ndarray, k: int,
              block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)``, Q x k: best first, ties to the lower candidate index."""
        ...

    def ranks(self, img: np.ndarray, gene: np.ndarray,
              block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(img2gene, gene2img)`` 1-based ranks of the true partner, ties against."""
        ...


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
    query: np.ndarray, cand: np.ndarray, k: int, block_size: int = 1024, *,
    engine: SimilarityEngine | None = None,
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
    if engine is not None:
        return engine.top_k(q, c, k, block_size)
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)
    score_out = np.empty((q.shape[0], k), dtype=np.float32)
    for start in range(0, q.shape[0], block_size):
        sims = q[start : start + block_size] @ c.T
        stop = start + len(sims)
        idx_out[start:stop], score_out[start:stop] = top_k_rows(sims, k)
    return idx_out, score_out


SAMPLE_STRIDE = 16  # top_k_rows: every 16th column bounds each row's k-th best score
MAX_POOL = 4 * SAMPLE_STRIDE  # a row keeping more per wanted entry goes row by row


def top_k_rows(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims`` (B x N): the ``k`` largest entries, best first, ties to the lower
    column -> ``(columns, scores)``, each B x k.

    The k-th best of every ``SAMPLE_STRIDE``-th column is a lower bound of the row's k-th
    best, so the entries at or above it hold the answer (about ``k x SAMPLE_STRIDE`` of
    them); one stable sort of each row's pool by score replaces a selection over the whole
    row. Identical to :func:`top_k_rows_exact`, which takes the rows with so many ties that
    the bound keeps more than ``MAX_POOL x k`` entries. NaN ranks below every number.
    """
    b, n = sims.shape
    if np.isnan(sims).any():  # (a diverged embedding) a NaN similarity ranks last
        sims = np.where(np.isnan(sims), -np.inf, sims)
    sample = sims[:, ::SAMPLE_STRIDE] if n >= SAMPLE_STRIDE * 4 * k else sims
    bound = np.partition(sample, sample.shape[1] - k, axis=1)[:, sample.shape[1] - k]
    above = sims >= bound[:, None]
    counts = above.sum(axis=1)
    heavy = counts > MAX_POOL * k  # mass ties (a collapsed embedding, a zero row)
    if heavy.any():
        idx = np.empty((b, k), dtype=np.int64)
        scores = np.empty((b, k), dtype=sims.dtype)
        idx[heavy], scores[heavy] = top_k_rows_exact(sims[heavy], k)
        if not heavy.all():
            idx[~heavy], scores[~heavy] = top_k_rows(sims[~heavy], k)
        return idx, scores
    rows, cols = np.nonzero(above)  # row-major: columns ascending within a row
    width = int(counts.max())
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    vals = np.full((b, width), -np.inf, dtype=sims.dtype)
    pool = np.zeros((b, width), dtype=np.int64)
    vals[rows, slot], pool[rows, slot] = sims[rows, cols], cols
    order = np.argsort(-vals, axis=1, kind="stable")[:, :k]  # stable: lower column first
    return np.take_along_axis(pool, order, 1), np.take_along_axis(vals, order, 1)


def top_k_rows_exact(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k_rows` row by row: entries strictly above the k-th best, plus ties at it
    (lowest column first)."""
    idx = np.empty((len(sims), k), dtype=np.int64)
    scores = np.empty((len(sims), k), dtype=sims.dtype)
    for row, s in enumerate(sims):
        kth = np.partition(s, -k)[-k]
        pool = np.flatnonzero(s >= kth)
        order = np.lexsort((pool, -s[pool]))[:k]
        idx[row], scores[row] = pool[order], s[pool[order]]
    return idx, scores


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
    img: np.ndarray, gene: np.ndarray, block_size: int = 1024, *,
    engine: SimilarityEngine | None = None,
) -> dict[str, np.ndarray]:
    """Whole-set ranks of the true partner in both directions: ``img2gene``, ``gene2img``.

    One blocked product serves both (the pair used to cost two ``N x N x D`` products):
    ``img2gene`` is ``rank_of_true(img, gene)`` exactly; ``gene2img`` counts down the
    columns of the same ``img x gene`` blocks (``gene @ img.T`` is their transpose, bit for
    bit with one BLAS) against each true pair's similarity, the true partner counted once.
    """
    _check_block(block_size)
    q, c = l2_normalize(img), l2_normalize(gene)
    _check_pair(q, c)
    n = q.shape[0]
    if n != c.shape[0]:
        raise ValueError(f"paired retrieval needs equal rows: {n} vs {c.shape[0]}")
    if engine is not None and n:
        img2gene, gene2img = engine.ranks(q, c, block_size)
        return {"img2gene": img2gene, "gene2img": gene2img}
    # the true pairs' similarities, each from the diagonal of its block's product
    true = np.zeros(n, dtype=np.float32)
    for a in range(0, n, block_size):
        true[a : a + block_size] = np.diagonal(q[a : a + block_size] @ c[a : a + block_size].T)
    img2gene = np.empty(n, dtype=np.int64)
    others = np.zeros(n, dtype=np.int64)  # gene2img: candidates at or above, partner aside
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        sims = q[start:stop] @ c.T
        rows = np.arange(stop - start)
        img2gene[start:stop] = (sims >= sims[rows, start + rows][:, None]).sum(axis=1)
        others += (sims >= true[None, :]).sum(axis=0)
        others[start:stop] -= sims[rows, start + rows] >= true[start:stop]
    return {"img2gene": img2gene, "gene2img": others + 1}


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
    img: np.ndarray, gene: np.ndarray, donors: np.ndarray, ks: Sequence[int], block_size: int,
    engine: SimilarityEngine | None = None,
) -> dict[str, float]:
    """Ranks with candidates restricted to the query's donor, pooled over all queries."""
    pooled: dict[str, list[np.ndarray]] = {"img2gene": [], "gene2img": []}
    for donor in np.unique(donors):
        rows = np.flatnonzero(donors == donor)
        for direction, r in retrieval_ranks(img[rows], gene[rows], block_size,
                                            engine=engine).items():
            pooled[direction].append(r)
    ranks = {d: np.concatenate(r) for d, r in pooled.items()}
    out = _summarize(ranks, ks, suffix="_within_donor")
    return {k: v for k, v in out.items() if not k.startswith("median_rank")}


def _in_batch(
    img: np.ndarray, gene: np.ndarray, ks: Sequence[int], size: int, repeats: int, seed: int
) -> dict[str, float]:
    """HESCAPE-style Recall@k inside random batches of ``size`` (seeded), averaged.

    Each repeat is one seeded permutation cut into full batches (the remainder is left
    out); all batches of a repeat are ranked in one stacked matrix product (per batch the
    same product, normalisation and tie rule as :func:`retrieval_ranks`)."""
    n = img.shape[0]
    size_eff = min(size, n)
    rng = np.random.default_rng(seed)
    img, gene = l2_normalize(img), l2_normalize(gene)  # as rank_of_true normalises each batch
    hits: dict[str, list[np.ndarray]] = {"img2gene": [], "gene2img": []}
    n_full = n // size_eff
    diag = np.arange(size_eff)
    for _ in range(repeats):
        perm = rng.permutation(n)
        rows = perm[: n_full * size_eff].reshape(n_full, size_eff)
        for direction, (q, c) in {"img2gene": (img, gene), "gene2img": (gene, img)}.items():
            sims = q[rows] @ c[rows].transpose(0, 2, 1)  # n_full x size x size
            true = sims[:, diag, diag]
            hits[direction].append((sims >= true[:, :, None]).sum(axis=2).ravel())
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
    engine: SimilarityEngine | None = None,
) -> dict[str, float]:
    """Image<->gene retrieval metrics over the whole set, within donor and in-batch.

    Keys: ``r{k}_img2gene``, ``r{k}_gene2img``, ``mean_rank_*``, ``median_rank_*``,
    ``r{k}_*_within_donor``, ``mean_rank_*_within_donor`` (only with ``donors``),
    ``inbatch{B}_r{k}_*`` (HESCAPE-comparable; NOT comparable with the whole-set figure;
    ``B = min(inbatch_size, N)``, so the key always names the real batch size) and
    ``retrieval_n``. ``precomputed_ranks`` reuses ``retrieval_ranks`` output; ``engine`` computes
    the whole-set and within-donor products (the in-batch ones are too small to move).
    """
    img, gene = l2_normalize(img), l2_normalize(gene)
    if img.shape != gene.shape:
        raise ValueError(
            f"img and gene embeddings must have equal shapes: {img.shape} vs {gene.shape}"
        )
    if img.shape[0] < 2:
        raise ValueError(f"retrieval needs at least 2 pairs, got {img.shape[0]}")
    ks = sorted({int(k) for k in ks})
    ranks = precomputed_ranks or retrieval_ranks(img, gene, block_size, engine=engine)
    out = _summarize(ranks, ks)
    if donors is not None:
        donors = np.asarray(donors)
        if donors.shape[0] != img.shape[0]:
            raise ValueError(f"donors has {donors.shape[0]} entries for {img.shape[0]} pairs")
        out.update(_within_donor(img, gene, donors, ks, block_size, engine))
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
