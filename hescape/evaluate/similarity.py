"""Whole-set similarity products on a torch device (a GPU when the process has one).

Exact kNN and whole-set retrieval are ``N_test x N_train x D`` products: at 200k spots the
evaluation's largest cost on CPU, a fraction of a second on a GPU. :class:`TorchEngine`
implements ``hescape.metrics.retrieval.SimilarityEngine`` with the numpy path's rules: top-k
best first with ties to the lower candidate index (the same bounded-pool selection as
``retrieval.top_k_rows``), ranks with ties counting against, ``gene2img`` counted down the
columns of the ``img x gene`` blocks. The products are float32 with reduced-precision
(TF32) matmul switched off while they run, so figures differ from the CPU path only where
two similarities tie to within float32 rounding.

``default_engine()`` is what the probes use: the torch engine on ``cuda`` when this process
sees a GPU (a Ray trial sees only its own), else None (numpy, which beat torch on CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from hescape.metrics.retrieval import MAX_POOL, SAMPLE_STRIDE, top_k_rows_exact


class TorchEngine:
    """``SimilarityEngine`` on ``device`` (``"cuda"``, ``"cuda:1"``, ``"cpu"``)."""

    def __init__(self, device: str = "cuda") -> None:
        import torch

        self.device = torch.device(device)

    @contextlib.contextmanager
    def _exact(self) -> Iterator[None]:
        """float32 products: no TF32 while the engine runs (restored afterwards)."""
        import torch

        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            with torch.no_grad():
                yield
        finally:
            torch.set_float32_matmul_precision(saved)

    def _put(self, x: np.ndarray):
        import torch

        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)

    def top_k(self, query: np.ndarray, cand: np.ndarray, k: int,
              block_size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.empty((len(query), k), dtype=np.int64)
        scores = np.empty((len(query), k), dtype=np.float32)
        with self._exact():
            c = self._put(cand)
            for start in range(0, len(query), block_size):
                sims = self._put(query[start : start + block_size]) @ c.T
                stop = start + sims.shape[0]
                idx[start:stop], scores[start:stop] = self._top_k_rows(sims, k)
        return idx, scores

    def _top_k_rows(self, sims, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``retrieval.top_k_rows`` on the device: the k-th best of every
        ``SAMPLE_STRIDE``-th column bounds the pool; one (row, -score, column) order."""
        import torch

        b, n = sims.shape
        sims = torch.where(torch.isnan(sims), float("-inf"), sims)  # NaN ranks last
        sample = sims[:, ::SAMPLE_STRIDE] if n >= SAMPLE_STRIDE * 4 * k else sims
        bound = torch.topk(sample, k, dim=1).values[:, -1]
        above = sims >= bound[:, None]
        counts = above.sum(dim=1)
        if int(counts.sum()) > MAX_POOL * k * b:  # mass ties: row by row, on the host
            return top_k_rows_exact(sims.cpu().numpy(), k)
        rows, cols = above.nonzero(as_tuple=True)  # row-major: columns ascending per row
        vals = sims[rows, cols]
        order = torch.sort(-vals, stable=True).indices  # by -score, column order kept
        order = order[torch.sort(rows[order], stable=True).indices]  # then by row
        first = torch.cumsum(counts, 0) - counts
        pick = order[(first[:, None] + torch.arange(k, device=sims.device)).reshape(-1)]
        return (cols[pick].reshape(b, k).cpu().numpy().astype(np.int64),
                vals[pick].reshape(b, k).cpu().numpy())

    def ranks(self, img: np.ndarray, gene: np.ndarray,
              block_size: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n = len(img)
        with self._exact():
            q, c = self._put(img), self._put(gene)
            true = torch.cat([torch.diagonal(q[a : a + block_size] @ c[a : a + block_size].T)
                              for a in range(0, n, block_size)])
            img2gene = torch.empty(n, dtype=torch.int64, device=self.device)
            others = torch.zeros(n, dtype=torch.int64, device=self.device)
            for start in range(0, n, block_size):
                stop = min(start + block_size, n)
                sims = q[start:stop] @ c.T
                rows = torch.arange(stop - start, device=self.device)
                own = sims[rows, start + rows]
                img2gene[start:stop] = (sims >= own[:, None]).sum(dim=1)
                others += (sims >= true[None, :]).sum(dim=0)
                others[start:stop] -= (own >= true[start:stop]).long()
        return img2gene.cpu().numpy(), (others + 1).cpu().numpy()


def default_engine() -> TorchEngine | None:
    """The torch engine on this process's GPU, or None (numpy) without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return TorchEngine("cuda") if torch.cuda.is_available() else None
