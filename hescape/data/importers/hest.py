"""HEST-1k layout -> canonical dataset.

``<root>/st/<id>.h5ad`` (counts), ``<root>/patches/<id>.h5`` (``img`` N x 224 x 224 x 3,
``barcode``, ``coords``) and a metadata CSV (``id``, ``patient``, ``organ``,
``oncotree_code``...). Patches are matched to spots by barcode; patient becomes ``donor``
and id becomes ``slide``. Slides stream one at a time.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata import AnnData

from hescape.config import SplitConfig
from hescape.data.contract import DatasetWriter, resolve_split
from hescape.data.errors import DataError
from hescape.data.importers.common import align_genes, check_exists, concat, counts_matrix
from hescape.data.validate import GenePolicy

META_LABELS = ("organ", "oncotree_code", "species", "disease_state", "tissue")


def _decode(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).reshape(len(values), -1)[:, 0]
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in flat])


def read_metadata(path: Path, ids: list[str] | None) -> pd.DataFrame:
    meta = pd.read_csv(check_exists(path, "HEST metadata CSV"), dtype=str)
    missing = {"id", "patient"} - set(meta.columns)
    if missing:
        raise DataError(f"{path}: metadata CSV lacks columns {sorted(missing)}; HEST metadata "
                        "has id, patient, organ, oncotree_code")
    meta["id"] = meta["id"].str.strip()
    if ids:
        unknown = sorted(set(ids) - set(meta["id"]))
        if unknown:
            raise DataError(f"{path}: ids {unknown} are not in the metadata CSV")
        meta = meta[meta["id"].isin(ids)]
    empty = meta["patient"].isna()
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(f"{path}: column 'patient' is empty at row {row + 1} (id "
                        f"{meta['id'].iloc[row]!r}); fill in the donor of each sample")
    return meta.reset_index(drop=True)


def _read_slide(root: Path, row: pd.Series, counts_layer: str | None) -> tuple[AnnData, np.ndarray]:
    """Spots of one sample that have a patch, and the matching patch row per spot."""
    sid = row["id"]
    st_path = check_exists(root / "st" / f"{sid}.h5ad", "HEST st/<id>.h5ad")
    h5_path = check_exists(root / "patches" / f"{sid}.h5", "HEST patches/<id>.h5")
    src = ad.read_h5ad(st_path)
    with h5py.File(h5_path, "r") as f:
        if "img" not in f or "barcode" not in f:
            raise DataError(f"{h5_path}: needs datasets 'img' and 'barcode', has {list(f)}")
        barcodes = _decode(f["barcode"][:])
    pos = pd.Index(barcodes).get_indexer(src.obs_names.astype(str))
    keep = np.flatnonzero(pos >= 0)
    if len(keep) == 0:
        raise DataError(f"{h5_path}: no barcode matches a spot of {st_path} (e.g. "
                        f"{barcodes[:2].tolist()} vs {src.obs_names[:2].tolist()})")
    a = AnnData(X=counts_matrix(src, layer=counts_layer, file=str(st_path))[keep],
                obs=pd.DataFrame(index=[f"{sid}_{b}" for b in src.obs_names[keep]]),
                var=pd.DataFrame(index=src.var_names.astype(str)))
    a.obs["donor"], a.obs["slide"] = str(row["patient"]), sid
    a.obs["barcode"] = src.obs_names[keep].astype(str)
    for col in META_LABELS:
        if col in row.index and pd.notna(row[col]):
            a.obs[col] = str(row[col])
    if "spatial" in src.obsm:
        a.obsm["spatial"] = np.asarray(src.obsm["spatial"], dtype=np.float32)[keep, :2]
    return a, pos[keep]


def _copy_patches(h5_path: Path, rows: np.ndarray, store: np.ndarray, start: int,
                  size: int | None) -> None:
    from PIL import Image

    order = np.argsort(rows)
    with h5py.File(h5_path, "r") as f:
        img = f["img"]
        for lo in range(0, len(rows), 256):
            sel = order[lo:lo + 256]
            block = img[np.sort(rows[sel]).tolist()]  # h5py needs increasing indices
            if size is not None and block.shape[1] != size:
                block = np.stack([np.asarray(Image.fromarray(b).resize((size, size),
                                                                        Image.BILINEAR))
                                  for b in block])
            store[start + sel] = block


def import_hest(root: str | Path, out: str | Path, *, metadata: str | Path | None = None,
                ids: list[str] | None = None, gene_policy: GenePolicy = "error",
                patch_size: int | None = None, mpp: float | None = 0.5,
                counts_layer: str | None = None, split: SplitConfig | dict | None = None,
                progress: bool = True, overwrite: bool = False) -> Path:
    """Import HEST-1k samples (all in the metadata CSV, or ``ids``) as one dataset."""
    from tqdm.auto import tqdm

    root = check_exists(root, "HEST root directory")
    meta_path = Path(metadata) if metadata else _find_metadata(root)
    meta = read_metadata(meta_path, ids)
    slides = {}
    for _, row in tqdm(meta.iterrows(), total=len(meta), desc="index", disable=not progress):
        slides[row["id"]] = _read_slide(root, row, counts_layer)
    parts = align_genes({k: a for k, (a, _) in slides.items()}, gene_policy,
                        source="import_hest")
    adata = concat(parts)
    split_dict = resolve_split(adata, split if split is not None else SplitConfig(),
                               source="import_hest")
    sizes = {}
    for sid in slides:
        with h5py.File(root / "patches" / f"{sid}.h5", "r") as f:
            shape = f["img"].shape
        if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
            raise DataError(f"{root / 'patches' / f'{sid}.h5'}: img has shape {shape}; "
                            "expected N x S x S x 3")
        sizes[sid] = shape[1]
    if patch_size is None and len(set(sizes.values())) > 1:
        raise DataError(f"import_hest: patch sizes differ between slides {sizes}; pass "
                        "patch_size (--patch-size) to resize")
    size = patch_size or next(iter(sizes.values()))
    with DatasetWriter(out, overwrite=overwrite) as writer:
        store = writer.allocate(adata.n_obs, size)
        start = 0
        for sid, (a, rows) in tqdm(slides.items(), desc="slides", disable=not progress):
            _copy_patches(root / "patches" / f"{sid}.h5", rows, store, start, patch_size)
            start += a.n_obs
        first = next(iter(sizes.values()))
        return writer.commit(adata, split_dict, source="hest",
                             mpp=None if mpp is None else mpp * first / size)


def _find_metadata(root: Path) -> Path:
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise DataError(f"{root}: found {len(found)} CSV files at the top level; pass the HEST "
                        "metadata CSV explicitly (metadata= / --metadata)")
    return found[0]
