"""``pca_regress``: PCA fitted on training donors, then the batch regressed out of the PCs.

The linear model ``PC = grand mean + batch offset + residual`` is fitted per PC on training
rows (with a categorical batch this is each batch's mean minus the training grand mean);
corrected PCs are the residuals plus the grand mean, as scanpy's ``regress_out`` does with
a categorical batch. A held-out batch has no fitted offset: its own offset is estimated
from its own cells only (its mean PC scores against the training grand mean), so training
rows never depend on held-out rows and held-out donors never depend on each other.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from hescape.preprocess.expression import MethodInput, MethodOutput
from hescape.preprocess.methods.pca import log_pcs
from hescape.preprocess.spec import MethodOptions, MethodSpec, register


class PcaRegressOptions(MethodOptions):
    n_pcs: int = Field(30, ge=2, description="principal components (fitted on training rows)")


def regress_batches(z: np.ndarray, batches: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """``z`` minus each batch's mean offset from the training grand mean (float32)."""
    grand = z[fit_rows].mean(axis=0)
    out = np.empty_like(z)
    for name in np.unique(batches):
        rows = batches == name
        # a training batch's offset comes from its training rows; a new batch's from its own
        own = rows & fit_rows if (rows & fit_rows).any() else rows
        out[rows] = z[rows] - (z[own].mean(axis=0) - grand)
    return out.astype(np.float32)


def run(inp: MethodInput, opts: PcaRegressOptions) -> MethodOutput:
    """Batch-regressed PC scores of every row (N x n_pcs)."""
    z, info = log_pcs(inp, opts.n_pcs, inp.train_mask)
    out = regress_batches(z, inp.batches, inp.train_mask)
    return MethodOutput(X=out, feature_names=[f"PC{i + 1}" for i in range(out.shape[1])],
                        info={**info, "heldout_mapping": "own batch mean"})


SPEC = register(MethodSpec(
    name="pca_regress",
    summary="PCA (training donors) with the batch regressed out of the PCs",
    run=run,
    options=PcaRegressOptions,
    needs_batches=True,
    heldout="each held-out batch's offset is estimated from its own cells against the "
            "training grand mean",
    output="features",
))
