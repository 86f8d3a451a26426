"""PCA of log-normalised expression, fitted on training rows only (inductive)."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from hescape.config import ExpressionPreprocess
from hescape.preprocess.expression import (
    VARIANTS,
    PreparedExpression,
    normalize_log1p,
    select_genes,
)

SCALE_CLIP = 10.0  # scanpy's sc.pp.scale(max_value=10) convention


def fit_pca(x_log: np.ndarray, fit_rows: np.ndarray, n_pcs: int) -> tuple[np.ndarray, dict]:
    """Standardise with ``fit_rows`` statistics (clip 10), PCA fitted on ``fit_rows``.

    Returns the scores of every row (float32 N x n) and info (explained variance).
    """
    from sklearn.decomposition import PCA

    mean = x_log[fit_rows].mean(axis=0)
    std = x_log[fit_rows].std(axis=0)
    std[std == 0] = 1.0
    z = np.clip((x_log - mean) / std, -SCALE_CLIP, SCALE_CLIP)
    n = int(min(n_pcs, z.shape[1] - 1, int(fit_rows.sum()) - 1))
    if n < 2:
        raise ValueError(f"PCA needs >= 3 genes and >= 3 training rows; got {z.shape[1]} genes, "
                         f"{int(fit_rows.sum())} training rows")
    pca = PCA(n_components=n, svd_solver="full", random_state=0).fit(z[fit_rows])
    scores = pca.transform(z).astype(np.float32)
    info = {"n_pcs": n, "explained_variance_ratio": float(pca.explained_variance_ratio_.sum())}
    return scores, info


def log_pcs(adata: AnnData, cfg: ExpressionPreprocess, fit_rows: np.ndarray
            ) -> tuple[np.ndarray, dict]:
    """normalise -> gene selection (on ``fit_rows``) -> PCA (fitted on ``fit_rows``)."""
    x = normalize_log1p(adata)
    genes = select_genes(x, cfg.n_top_genes, fit_rows)
    scores, info = fit_pca(x[:, genes], fit_rows, cfg.n_pcs)
    info["n_genes"] = int(len(genes))
    return scores, info


@VARIANTS.register("pca")
def pca_variant(adata: AnnData, cfg: ExpressionPreprocess, *, batches: np.ndarray,
                train_mask: np.ndarray, progress: bool) -> PreparedExpression:
    """Inductive PCA: fitted on training rows, applied to all."""
    scores, info = log_pcs(adata, cfg, train_mask)
    return PreparedExpression(X=scores, feature_names=[f"PC{i + 1}" for i in range(scores.shape[1])],
                              saw_heldout=False, method="pca", info=info)
