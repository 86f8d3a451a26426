"""ComBat (scanpy.pp.combat) on log-normalised expression: transductive over all rows."""

from __future__ import annotations

import warnings

import numpy as np
from anndata import AnnData

from hescape.config import ExpressionPreprocess
from hescape.preprocess.expression import (
    VARIANTS,
    PreparedExpression,
    normalize_log1p,
    select_genes,
)


@VARIANTS.register("combat")
def combat_variant(adata: AnnData, cfg: ExpressionPreprocess, *, batches: np.ndarray,
                   train_mask: np.ndarray, progress: bool) -> PreparedExpression:
    """ComBat location/scale adjustment per batch, fitted on every row (held-out donors
    included, since ComBat estimates each batch's parameters from that batch's own cells).
    Genes constant within a batch are kept unadjusted by scanpy; output is corrected
    log-expression (N x G)."""
    import scanpy as sc

    x = normalize_log1p(adata)
    genes = select_genes(x, cfg.n_top_genes, train_mask)
    tmp = AnnData(X=x[:, genes].astype(np.float64))
    tmp.obs["batch"] = batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance genes within a batch
        corrected = sc.pp.combat(tmp, key="batch", inplace=False)
    corrected = np.nan_to_num(np.asarray(corrected), nan=0.0).astype(np.float32)
    return PreparedExpression(X=corrected, feature_names=[str(g) for g in adata.var_names[genes]],
                              saw_heldout=not bool(train_mask.all()), method="combat",
                              info={"n_genes": int(len(genes)), "fit_rows": "all"})
