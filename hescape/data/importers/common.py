"""Shared pieces of the importers: gene harmonisation, concatenation, reading counts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hescape.data.errors import DataError
from hescape.data.validate import GenePolicy, harmonise_genes

SPOT_DIAMETER_UM = 55.0  # Visium spot diameter


def counts_matrix(adata: AnnData, *, layer: str | None, file: str) -> sp.csr_matrix:
    """The raw counts of ``adata`` (X, a layer, or .raw) as CSR."""
    if layer == "raw":
        if adata.raw is None:
            raise DataError(f"{file}: counts_layer='raw' but the file has no .raw; "
                            f"use one of X or layers {list(adata.layers)}")
        X = adata.raw[:, adata.var_names].X if set(adata.var_names) <= set(
            adata.raw.var_names) else adata.raw.X
    elif layer:
        if layer not in adata.layers:
            raise DataError(f"{file}: no layer {layer!r}; available: {list(adata.layers)}")
        X = adata.layers[layer]
    else:
        X = adata.X
    return sp.csr_matrix(X)


def align_genes(parts: Mapping[str, AnnData], policy: GenePolicy, *,
                source: str) -> list[AnnData]:
    """Put every slide's AnnData on one gene list under ``policy`` (see harmonise_genes)."""
    genes, missing = harmonise_genes(parts, policy, source=source)
    out = []
    for name, a in parts.items():
        if list(map(str, a.var_names)) == genes:
            out.append(a)
            continue
        col = pd.Index(list(map(str, a.var_names))).get_indexer(genes)
        keep = np.flatnonzero(col >= 0)
        proj = sp.csr_matrix((np.ones(len(keep)), (col[keep], keep)),
                             shape=(a.n_vars, len(genes)))
        mat = (sp.csr_matrix(a.X) @ proj).astype(a.X.dtype)
        b = AnnData(X=sp.csr_matrix(mat), obs=a.obs.copy(),
                    var=pd.DataFrame(index=pd.Index(genes)))
        b.obsm = dict(a.obsm)
        b.uns["genes_filled_with_zero"] = missing.get(name, [])
        out.append(b)
    return out


def concat(parts: list[AnnData]) -> AnnData:
    """Row-concatenate slides already on one gene list (keeps obsm['spatial'])."""
    X = sp.vstack([sp.csr_matrix(p.X) for p in parts]).tocsr()
    obs = pd.concat([p.obs for p in parts])
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=parts[0].var_names.copy()))
    if all("spatial" in p.obsm for p in parts):
        adata.obsm["spatial"] = np.concatenate(
            [np.asarray(p.obsm["spatial"], dtype=np.float32)[:, :2] for p in parts])
    return adata


def check_exists(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} not found; check the path")
    return path

