"""``pca``: PCA of log-normalised expression, fitted on training rows only (inductive).

``fit_pca`` / ``log_pcs`` are shared with the methods that work on PCs (harmony, pca_regress).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from hescape.preprocess.expression import MethodInput, MethodOutput, select_genes
from hescape.preprocess.spec import MethodOptions, MethodSpec, register

SCALE_CLIP = 10.0  # scanpy's sc.pp.scale(max_value=10) convention


class PcaOptions(MethodOptions):
    n_pcs: int = Field(30, ge=2, description="principal components (capped at genes-1, rows-1)")


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


def log_pcs(inp: MethodInput, n_pcs: int, fit_rows: np.ndarray) -> tuple[np.ndarray, dict]:
    """normalise -> gene selection and PCA, both fitted on ``fit_rows``."""
    x = inp.log_expression()
    genes = select_genes(x, inp.n_top_genes, fit_rows)
    scores, info = fit_pca(x[:, genes], fit_rows, n_pcs)
    info["n_genes"] = int(len(genes))
    return scores, info


def run(inp: MethodInput, opts: PcaOptions) -> MethodOutput:
    """PC scores of every row (N x n_pcs)."""
    scores, info = log_pcs(inp, opts.n_pcs, inp.train_mask)
    return MethodOutput(X=scores, feature_names=[f"PC{i + 1}" for i in range(scores.shape[1])],
                        info=info)


SPEC = register(MethodSpec(
    name="pca",
    summary="PCA of log-normalised expression (fitted on training donors)",
    run=run,
    options=PcaOptions,
    heldout="held-out rows are projected with the training standardisation and loadings",
    output="features",
    legacy_keys={"n_pcs": "n_pcs"},
))
