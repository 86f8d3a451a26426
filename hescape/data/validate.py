"""Validation of paired data: every problem raises a DataError naming file, row/column, fix.

Checks run before any expensive work (no training, no image decoding of the whole set).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hescape.data.errors import DataError

REQUIRED_OBS = ("donor", "slide")
GenePolicy = Literal["intersection", "union", "error"]


def _values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no densifying of sparse)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X)


def _first_bad(X, mask_fn) -> tuple[int, int]:
    """(row, col) of the first value where ``mask_fn`` is true."""
    if sp.issparse(X):
        coo = sp.coo_matrix(X)
        idx = int(np.flatnonzero(mask_fn(coo.data))[0])
        return int(coo.row[idx]), int(coo.col[idx])
    r, c = np.argwhere(mask_fn(np.asarray(X)))[0]
    return int(r), int(c)


def validate_counts(adata: AnnData, *, file: str, integer: bool = True) -> None:
    """Counts must be finite, non-negative and (for raw counts) integers."""
    X = adata.X
    if X is None or adata.n_vars == 0:
        raise DataError(f"{file}: no expression matrix (X is empty); import counts, or load "
                        "with require_expression=False for image-only use")
    vals = _values(X)
    if not np.issubdtype(vals.dtype, np.number):
        raise DataError(f"{file}: X has dtype {vals.dtype}; counts must be numeric")
    checks = [(lambda v: ~np.isfinite(v), "is NaN/inf", "remove or fix those spots")]
    checks.append((lambda v: v < 0, "is negative", "counts must be >= 0; import raw counts, "
                   "not scaled/centred data"))
    if integer and np.issubdtype(vals.dtype, np.floating):
        checks.append((lambda v: np.isfinite(v) & (v != np.round(v)), "is not an integer",
                       "raw integer counts are required; import adata.raw / layers['counts'], "
                       "or pass allow_non_integer=True for normalised data"))
    for mask_fn, what, fix in checks:
        if np.any(mask_fn(vals)):
            r, c = _first_bad(X, mask_fn)
            value = X[r, c] if not sp.issparse(X) else X.tocsr()[r, c]
            raise DataError(
                f"{file}: count at row {r} (obs {adata.obs_names[r]!r}), column {c} "
                f"(gene {adata.var_names[c]!r}) {what} ({float(value)!r}); {fix}")


def _check_unique(index: pd.Index, *, file: str, axis: str) -> None:
    dup = index[index.duplicated()]
    if len(dup):
        rows = np.flatnonzero(index.isin(dup[:1]))
        raise DataError(
            f"{file}: duplicated {axis} names, e.g. {list(dup.unique()[:5])} (rows "
            f"{rows.tolist()[:5]}); make them unique (adata.{axis}_names_make_unique())")


def validate_obs(adata: AnnData, *, file: str, required: tuple[str, ...] = REQUIRED_OBS) -> None:
    """Unique obs/var names and the required obs columns, without missing values."""
    _check_unique(adata.obs_names, file=file, axis="obs")
    _check_unique(adata.var_names, file=file, axis="var")
    for col in required:
        if col not in adata.obs.columns:
            raise DataError(
                f"{file}: obs column {col!r} is missing (have {list(adata.obs.columns)}); "
                f"add it, or name the column holding it (e.g. --{col}-key)")
        missing = adata.obs[col].isna().to_numpy()
        if missing.any():
            r = int(np.flatnonzero(missing)[0])
            raise DataError(
                f"{file}: obs column {col!r} is empty at row {r} (obs "
                f"{adata.obs_names[r]!r}) and {int(missing.sum()) - 1} more; fill it in")


def validate_patches(patches: np.ndarray, n_obs: int, *, file: str) -> None:
    """uint8, N x H x W x 3, N equal to the number of obs, H == W."""
    if patches.dtype != np.uint8:
        raise DataError(f"{file}: patches have dtype {patches.dtype}; expected uint8 "
                        "(convert with np.clip(x, 0, 255).astype(np.uint8))")
    if patches.ndim != 4:
        raise DataError(f"{file}: patches have shape {patches.shape}; expected N x H x W x 3")
    if patches.shape[-1] != 3:
        raise DataError(f"{file}: patches have {patches.shape[-1]} channels (shape "
                        f"{patches.shape}); expected RGB (3, channels last); drop alpha / "
                        "move the channel axis last")
    if patches.shape[1] != patches.shape[2] or patches.shape[1] < 8:
        raise DataError(f"{file}: patches are {patches.shape[1]} x {patches.shape[2]}; expected "
                        "square patches of at least 8 px (re-cut or resize them)")
    if patches.shape[0] != n_obs:
        raise DataError(
            f"{file}: {patches.shape[0]} patches but {n_obs} obs rows; rows must pair one to "
            "one in obs order (re-import, or subset adata to the spots that have patches)")


def validate_adata(adata: AnnData, *, file: str, require_expression: bool = True,
                   integer: bool = True) -> None:
    """All expression-side checks."""
    validate_obs(adata, file=file)
    if require_expression:
        validate_counts(adata, file=file, integer=integer)


def harmonise_genes(panels: Mapping[str, AnnData], policy: GenePolicy = "error", *,
                    source: str = "import") -> tuple[list[str], dict[str, list[str]]]:
    """Common gene list over slides under ``policy``; returns (genes, missing per slide).

    ``error`` raises naming the genes that differ; ``intersection`` keeps genes present in
    every slide; ``union`` keeps all genes (absent genes become 0 counts: recorded).
    """
    names = {k: list(map(str, a.var_names)) for k, a in panels.items()}
    first = next(iter(names.values()))
    union: list[str] = list(dict.fromkeys(g for v in names.values() for g in v))
    common = set.intersection(*(set(v) for v in names.values()))
    missing = {k: [g for g in union if g not in set(v)] for k, v in names.items()}
    differ = {k: m for k, m in missing.items() if m}
    if differ and policy == "error":
        detail = "; ".join(f"slide {k} lacks {m[:8]}{'...' if len(m) > 8 else ''}"
                           for k, m in list(differ.items())[:5])
        raise DataError(
            f"{source}: gene panels differ between slides ({detail}); choose "
            "gene_policy='intersection' (keep shared genes) or 'union' (fill absent with 0)")
    if policy == "intersection":
        genes = [g for g in first if g in common]
        if not genes:
            raise DataError(f"{source}: slides share no genes; check the panels / var names")
        return genes, differ
    return union, differ
