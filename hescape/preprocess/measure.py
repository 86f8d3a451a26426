"""What a preprocessing variant did: batch mixing and biology conservation before training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from hescape.preprocess.expression import PreparedExpression, check_batch_key

if TYPE_CHECKING:
    from anndata import AnnData

MEASURE_DIMS = 50  # wider outputs (genes) are measured on their top PCs, as scib does


def measure_variant(
    prepared: PreparedExpression,
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str | None = None,
    ignore_labels: Sequence[str] = (),
    rows: np.ndarray | None = None,
    subsample: int | None = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Mixing/bio metrics of ``prepared.X``, keys ``pre/<metric>``.

    Rows with a missing label or one in ``ignore_labels`` (e.g. "NA", "unassigned") are left
    out; ``rows`` restricts to a subset (e.g. held-out donors). Outputs wider than 50
    features are reduced to 50 PCs first (fewer when fewer rows are measured: at most
    rows - 1), so genes and latents are compared alike.
    ``pre/n_batches`` is the number of batches among the measured rows.
    """
    from hescape.metrics.mixing import mixing_metrics

    batches = check_batch_key(adata, batch_key, need_batches=False)
    keep = np.ones(adata.n_obs, dtype=bool) if rows is None else np.zeros(adata.n_obs, bool)
    if rows is not None:
        keep[rows] = True
    labels = None
    if label_key is not None:
        if label_key not in adata.obs.columns:
            raise ValueError(f"label key {label_key!r} is not an obs column; available: "
                             f"{', '.join(map(str, adata.obs.columns))}")
        col = adata.obs[label_key]
        keep &= col.notna().to_numpy() & ~col.astype(str).isin(list(ignore_labels)).to_numpy()
        labels = col.astype(str).to_numpy()[keep]
    x = prepared.X[keep]
    if len(x) < 2:
        raise ValueError(f"measure_variant: {len(x)} row(s) to measure (rows with a label, in "
                         "the measured part); mixing needs at least 2")
    # at most min(rows, features) PCs exist: a small held-out part (22 spots) gets fewer
    dims = min(MEASURE_DIMS, x.shape[0] - 1, x.shape[1])
    if x.shape[1] > dims:
        from sklearn.decomposition import PCA

        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    metrics = mixing_metrics(x, batches[keep], labels, subsample=subsample, seed=seed)
    metrics["dims"] = float(x.shape[1])
    metrics.setdefault("n_batches", float(len(np.unique(batches[keep]))))
    return {f"pre/{k}": float(v) for k, v in metrics.items()}
