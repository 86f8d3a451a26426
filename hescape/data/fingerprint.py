"""Content fingerprint of a dataset: counts, obs/var, spatial and patches (never paths)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hescape.data.rowio import read_rows

FULL_HASH_BYTES = 256 * 2**20   # hash every patch byte below this size
SAMPLED_ROWS = 1024             # else: this many whole rows + a strided probe of every row


def _update_array(h, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))


def _hash_counts(h, X) -> None:
    if X is None:
        h.update(b"noX")
        return
    m = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    m = m.copy()
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    _update_array(h, np.asarray(m.shape, dtype=np.int64))
    _update_array(h, m.indptr.astype(np.int64))
    _update_array(h, m.indices.astype(np.int64))
    _update_array(h, m.data.astype(np.float64))


def _hash_frame(h, df: pd.DataFrame) -> None:
    for col in sorted(map(str, df.columns)):
        h.update(col.encode())
        values = pd.util.hash_pandas_object(df[col].astype(str), index=False).to_numpy()
        _update_array(h, values)


def hash_expression(adata: AnnData) -> str:
    """Hash of counts, obs/var names, obs columns and obsm['spatial']."""
    h = hashlib.blake2b(digest_size=16)
    _hash_counts(h, adata.X if adata.n_vars else None)
    for names in (adata.obs_names, adata.var_names):
        _update_array(h, pd.util.hash_pandas_object(pd.Index(names).astype(str),
                                                    index=False).to_numpy())
    _hash_frame(h, adata.obs)
    if "spatial" in adata.obsm:
        _update_array(h, np.asarray(adata.obsm["spatial"], dtype=np.float64))
    return h.hexdigest()


def hash_patches(patches: np.ndarray) -> tuple[str, str]:
    """(hash, mode). Full bytes when small; else sampled rows + a strided probe of every row."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{patches.dtype.str}{patches.shape}".encode())
    n = patches.shape[0]
    chunk = max(1, (64 * 2**20) // max(1, patches[0].nbytes if n else 1))
    # blocks read through the file (read_rows): a memmapped store never becomes resident
    if patches.nbytes <= FULL_HASH_BYTES:
        for start in range(0, n, chunk):
            _update_array(h, read_rows(patches, start, start + chunk))
        return h.hexdigest(), "full"
    rows = np.unique(np.linspace(0, n - 1, SAMPLED_ROWS).astype(np.int64))
    for r in rows:
        _update_array(h, read_rows(patches, int(r), int(r) + 1)[0])
    step = max(1, patches.shape[1] // 8)
    for start in range(0, n, chunk):
        _update_array(h, read_rows(patches, start, start + chunk)[:, ::step, ::step])
    return h.hexdigest(), "sampled"


def fingerprint(adata: AnnData, patches: np.ndarray) -> tuple[str, str]:
    """(fingerprint, patch hash mode) of the dataset's content."""
    h = hashlib.blake2b(digest_size=16)
    h.update(hash_expression(adata).encode())
    patch_hash, mode = hash_patches(patches)
    h.update(patch_hash.encode())
    return h.hexdigest(), mode
