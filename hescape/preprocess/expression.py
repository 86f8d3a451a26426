"""Expression preprocessing: normalise, then optionally correct for batch.

``apply_expression_variant(adata, cfg, batch_key=..., train_mask=...)`` is the one entry
point. It looks the method up in the registry (``hescape.preprocess.spec``), runs every
check the spec declares before any fitting (so a bad key or bad counts fail in
milliseconds), calls the method's ``run(MethodInput, options) -> MethodOutput`` and
assembles the ``PreparedExpression``: kind (declared by the spec, and verified),
``saw_heldout`` and the common ``info``.

``saw_heldout`` is True when the fitted transform may have seen rows outside
``train_mask``: a transductive method with held-out rows present, or any fitting method
called without a mask (which we cannot audit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from hescape.preprocess.spec import get_method, options_of

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass
class PreparedExpression:
    """Preprocessed expression, rows in obs order, plus what was done to produce it.

    ``kind``: "expression" (non-negative log expression, columns are genes) or "features"
    (real-valued, possibly signed: PCs, corrected values, latents).
    """

    X: np.ndarray
    feature_names: list[str]
    saw_heldout: bool
    method: str
    info: dict[str, Any] = field(default_factory=dict)
    cache_key: str = ""
    kind: str = "expression"


@dataclass(frozen=True)
class MethodInput:
    """What a method's ``run`` receives (checks done): raw counts, batches, training rows."""

    adata: AnnData
    batches: np.ndarray  # str per row
    train_mask: np.ndarray  # bool per row
    n_top_genes: int | None
    progress: bool = False

    def log_expression(self) -> np.ndarray:
        """Library-size normalised log1p expression of every row (float32 N x G)."""
        return normalize_log1p(self.adata)

    def genes(self, x_log: np.ndarray) -> np.ndarray:
        """Indices of the genes to keep (``n_top_genes`` most variable on training rows)."""
        return select_genes(x_log, self.n_top_genes, self.train_mask)

    def gene_names(self, genes: np.ndarray) -> list[str]:
        return [str(g) for g in self.adata.var_names[genes]]


@dataclass
class MethodOutput:
    """A method's result: the matrix (N x D, obs order), its column names, what it did."""

    X: np.ndarray
    feature_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ normalise
def _check_counts(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ValueError("adata.X contains NaN or inf; expression must be finite counts")
    if (values < 0).any():
        raise ValueError("adata.X contains negative values; expected raw counts (>= 0), "
                         "not scaled or log-transformed data")


def counts_matrix(adata: AnnData) -> np.ndarray | sparse.csr_matrix:
    """``adata.X`` as float64 CSR (sparse input) or ndarray, checked finite and >= 0."""
    x = adata.X
    x = sparse.csr_matrix(x, dtype=np.float64) if sparse.issparse(x) else np.asarray(x, np.float64)
    _check_counts(x.data if sparse.issparse(x) else x)
    return x


ROWS_PER_BLOCK_CELLS = 2**22  # rows x genes per block of the sparse path (~32 MiB float64)


def normalize_log1p(adata: AnnData, *, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise each row to ``target_sum`` and log1p: float32 N x G.

    Rows with zero counts stay zero. Sparse counts stay as stored: rows are normalised block
    by block (float64 within a block) into the float32 result, so the only full-size array is
    the result itself.
    """
    if not sparse.issparse(adata.X):
        x = counts_matrix(adata)
        totals = x.sum(axis=1)
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        return np.log1p(x * scale[:, None]).astype(np.float32)
    x = sparse.csr_matrix(adata.X)  # CSR input: a view of the same arrays, no copy
    _check_counts(x.data)
    totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = np.empty(x.shape, dtype=np.float32)
    step = max(1, ROWS_PER_BLOCK_CELLS // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        block = sparse.diags(scale[a:a + step]) @ x[a:a + step].astype(np.float64)
        block.data = np.log1p(block.data)  # log1p(0) = 0: only the stored values change
        out[a:a + step] = block.toarray()
    return out


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


def _check_batches(adata: AnnData, batch_key: str, batches: np.ndarray, mask: np.ndarray,
                   method: str) -> None:
    """A batch-correcting method needs >= 2 batches with >= 2 spots among training rows."""
    check_batch_key(adata, batch_key, need_batches=True)
    check_batch_key(adata[mask], batch_key, need_batches=True)
    n_train = len(np.unique(batches[mask]))
    if n_train < 2:
        raise ValueError(f"preprocess.expression.method={method!r} corrects for batch but the "
                         f"training rows hold {n_train} batch of obs[{batch_key!r}]; use "
                         "method none/pca, or a batch key with >= 2 training batches")


# ----------------------------------------------------------------------- entry point
def apply_expression_variant(
    adata: AnnData,
    cfg: Any,
    *,
    batch_key: str,
    train_mask: np.ndarray | None = None,
    progress: bool = True,
) -> PreparedExpression:
    """Run the preprocessing ``cfg.method`` (an ``ExpressionPreprocess``) on raw counts.

    ``train_mask`` marks training rows: inductive fits use only them and map the others;
    ``None`` means every row is a training row.
    """
    spec = get_method(cfg.method)
    opts = options_of(cfg)
    batches = check_batch_key(adata, batch_key, need_batches=False)
    mask = check_train_mask(train_mask, adata.n_obs)
    if spec.needs_batches:
        _check_batches(adata, batch_key, batches, mask, spec.name)
    if spec.check_input is not None:
        spec.check_input(adata, opts)
    counts_matrix(adata)  # finite, non-negative
    inp = MethodInput(adata=adata, batches=batches, train_mask=mask,
                      n_top_genes=cfg.n_top_genes, progress=progress)
    out = spec.run(inp, opts)
    kind, protocol = spec.kind(opts), spec.protocol(opts)
    _check_output(spec.name, kind, out, adata.n_obs)
    saw = (protocol == "transductive" and not bool(mask.all())) or \
        (train_mask is None and spec.fits)  # no mask: cannot audit, so flagged
    info = {**out.info, "protocol": protocol, "n_train_rows": int(mask.sum()),
            "n_batches_train": int(len(np.unique(batches[mask]))), "batch_key": batch_key,
            "train_mask_given": train_mask is not None}
    return PreparedExpression(X=np.ascontiguousarray(out.X, dtype=np.float32),
                              feature_names=list(out.feature_names), saw_heldout=bool(saw),
                              method=spec.name, info=info, kind=kind)


def _check_output(method: str, kind: str, out: MethodOutput, n_obs: int) -> None:
    """The output has one row per obs, finite values, names per column, the declared kind."""
    x = out.X
    if x.ndim != 2 or x.shape[0] != n_obs or len(out.feature_names) != x.shape[1]:
        raise RuntimeError(f"method {method!r} returned shape {x.shape} with "
                           f"{len(out.feature_names)} names for {n_obs} rows")
    if not np.isfinite(x).all():
        raise RuntimeError(f"method {method!r} produced NaN or inf values")
    if kind == "expression" and (x < 0).any():
        raise RuntimeError(f"method {method!r} declares 'expression' output but produced "
                           f"negative values (min {float(x.min()):.3g}); declare 'features'")
