"""Expression preprocessing variants: normalise, then optionally correct for batch.

``apply_expression_variant(adata, cfg, batch_key=..., train_mask=...)`` is the one entry
point; each method lives in its own module and registers itself in ``VARIANTS``. All input
checks run before any fitting, so a bad key or bad counts fail in milliseconds.

``saw_heldout`` is True when the fitted transform may have seen rows outside ``train_mask``
(transductive ComBat/Harmony/scVI, or any fitted variant called without a mask, which we
cannot audit); ``none`` fits nothing and is never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse

from hescape.config import ExpressionPreprocess
from hescape.registry import Registry

VARIANTS: Registry[PreparedExpression] = Registry("expression preprocessing method")
BATCH_METHODS = ("harmony", "scvi", "combat")


@dataclass
class PreparedExpression:
    """Preprocessed expression, rows in obs order, plus what was done to produce it."""

    X: np.ndarray
    feature_names: list[str]
    saw_heldout: bool
    method: str
    info: dict[str, Any] = field(default_factory=dict)
    cache_key: str = ""


# ------------------------------------------------------------------------ normalise
def counts_matrix(adata: AnnData) -> np.ndarray | sparse.csr_matrix:
    """``adata.X`` as float64 CSR (sparse input) or ndarray, checked finite and >= 0."""
    x = adata.X
    x = sparse.csr_matrix(x, dtype=np.float64) if sparse.issparse(x) else np.asarray(x, np.float64)
    data = x.data if sparse.issparse(x) else x
    if not np.isfinite(data).all():
        raise ValueError("adata.X contains NaN or inf; expression must be finite counts")
    if (data < 0).any():
        raise ValueError("adata.X contains negative values; expected raw counts (>= 0), "
                         "not scaled or log-transformed data")
    return x


def normalize_log1p(adata: AnnData, *, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise each row to ``target_sum`` and log1p: float32 N x G.

    Rows with zero counts stay zero.
    """
    x = counts_matrix(adata)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sparse.issparse(x):
        x = sparse.diags(scale) @ x
        return np.log1p(x.toarray()).astype(np.float32)
    return np.log1p(x * scale[:, None]).astype(np.float32)


def select_genes(x_log: np.ndarray, n_top: int | None, fit_rows: np.ndarray) -> np.ndarray:
    """Indices of the ``n_top`` most variable genes of ``fit_rows`` (all genes if None)."""
    n_genes = x_log.shape[1]
    if n_top is None or n_top >= n_genes:
        return np.arange(n_genes)
    var = x_log[fit_rows].var(axis=0)
    return np.sort(np.argsort(-var, kind="stable")[:n_top])


# ---------------------------------------------------------------------------- checks
def check_batch_key(adata: AnnData, batch_key: str, *, need_batches: bool) -> np.ndarray:
    """The batch column as str array; clear ValueError on a missing key, NaN or 1-spot batch."""
    if batch_key not in adata.obs.columns:
        raise ValueError(f"batch key {batch_key!r} is not an obs column; available columns: "
                         f"{', '.join(map(str, adata.obs.columns)) or '(none)'}")
    col = adata.obs[batch_key]
    if col.isna().any():
        rows = np.flatnonzero(col.isna().to_numpy())
        raise ValueError(f"obs[{batch_key!r}] has {len(rows)} missing values (first at row "
                         f"{rows[0]}, obs name {adata.obs_names[rows[0]]!r}); fill or drop them")
    values = col.astype(str).to_numpy()
    if need_batches:
        names, counts = np.unique(values, return_counts=True)
        single = names[counts < 2]
        if len(single):
            raise ValueError(f"obs[{batch_key!r}]: batch(es) {list(single)} have a single spot; "
                             "batch correction cannot estimate their effect: drop them or "
                             "merge them into another batch")
    return values


def check_train_mask(train_mask: np.ndarray | None, n_obs: int) -> np.ndarray:
    """Boolean mask of training rows (all rows when None)."""
    if train_mask is None:
        return np.ones(n_obs, dtype=bool)
    mask = np.asarray(train_mask)
    if mask.dtype != bool or mask.shape != (n_obs,):
        raise ValueError(f"train_mask must be a boolean array of length n_obs={n_obs}, got "
                         f"dtype {mask.dtype} shape {mask.shape}")
    if not mask.any():
        raise ValueError("train_mask selects no rows; nothing to fit on")
    return mask


def check_integer_counts(adata: AnnData) -> None:
    """Raise unless ``adata.X`` holds whole numbers (scVI models counts)."""
    x = adata.X
    data = x.data if sparse.issparse(x) else np.asarray(x)
    bad = data != np.round(data)
    if np.any(bad):
        example = data[bad].ravel()[0]
        raise ValueError(f"scVI needs raw integer counts, but adata.X holds non-integers (e.g. "
                         f"{example!r}); pass the raw counts, or set "
                         "preprocess.expression.scvi.allow_non_integer: true to proceed anyway")


# ----------------------------------------------------------------------- entry point
def apply_expression_variant(
    adata: AnnData,
    cfg: ExpressionPreprocess,
    *,
    batch_key: str,
    train_mask: np.ndarray | None = None,
    progress: bool = True,
) -> PreparedExpression:
    """Run the preprocessing ``cfg.method`` on raw counts in ``adata.X``.

    ``train_mask`` marks training rows: inductive fits (PCA, inductive Harmony/scVI) use
    only them and map the others; ``None`` means every row is a training row.
    """
    _load_variants()
    if cfg.method not in VARIANTS:
        raise ValueError(VARIANTS.unknown_message(cfg.method))
    batches = check_batch_key(adata, batch_key, need_batches=cfg.method in BATCH_METHODS)
    mask = check_train_mask(train_mask, adata.n_obs)
    if cfg.method in BATCH_METHODS:
        check_batch_key(adata[mask], batch_key, need_batches=True)
    if cfg.method == "scvi" and not cfg.scvi.allow_non_integer:
        check_integer_counts(adata)
    counts_matrix(adata)  # finite, non-negative
    out = VARIANTS.create(cfg.method, adata, cfg, batches=batches, train_mask=mask,
                          progress=progress)
    out.info.setdefault("n_train_rows", int(mask.sum()))
    out.info.setdefault("batch_key", batch_key)
    out.info.setdefault("train_mask_given", train_mask is not None)
    if train_mask is None and cfg.method != "none":
        out.saw_heldout = True  # cannot audit: the caller did not say which rows are held out
    return out


def _load_variants() -> None:
    """Import the method modules (each registers itself)."""
    from hescape.preprocess import combat, harmony, pca, scvi_model  # noqa: F401


@VARIANTS.register("none")
def _none(adata: AnnData, cfg: ExpressionPreprocess, *, batches: np.ndarray,
          train_mask: np.ndarray, progress: bool) -> PreparedExpression:
    x = normalize_log1p(adata)
    genes = select_genes(x, cfg.n_top_genes, train_mask)
    return PreparedExpression(X=np.ascontiguousarray(x[:, genes]),
                              feature_names=[str(g) for g in adata.var_names[genes]],
                              saw_heldout=False, method="none",
                              info={"n_genes": int(len(genes))})
