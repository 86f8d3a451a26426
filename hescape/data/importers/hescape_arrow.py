"""HESCAPE's released parquet/arrow layout -> canonical dataset.

Rows: ``name`` (slide id), ``image`` (encoded bytes, or a struct with ``bytes``), ``gexp``
(counts, shape (1, G) or (G,)), ``cell_coords``, ``source``, ``tissue``, ... Gene names
come from the panel's reference h5ad (its var_names, in gexp order). Split CSVs with ``id``
and ``patient`` map slides to donors; their file names (train/val/test.csv) or a ``split``
column give the donor split. Files are read batch by batch (images decoded in pass 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from anndata import AnnData

from hescape.config import SplitConfig
from hescape.data.contract import DatasetWriter, resolve_split
from hescape.data.errors import DataError
from hescape.data.images import decode_image
from hescape.data.importers.common import check_exists
from hescape.data.splits import check_split, normalise_part

SKIP = {"image", "gexp", "cell_coords", "name", "id", "__index_level_0__"}


def list_files(sources: list[str | Path]) -> list[Path]:
    """Parquet/arrow files from files or directories (recursively), in sorted order."""
    out: list[Path] = []
    for src in sources:
        src = check_exists(src, "HESCAPE parquet/arrow file or directory")
        if src.is_dir():
            out += sorted(p for p in src.rglob("*") if p.suffix in (".parquet", ".arrow"))
        else:
            out.append(src)
    if not out:
        raise DataError(f"{sources}: no .parquet or .arrow files found")
    return out


def iter_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet file or an Arrow IPC file/stream (HF datasets)."""
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=256, columns=columns)
            return
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        for b in batches:
            yield b.select(columns) if columns else b
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as parquet/arrow ({exc}); is the file complete?"
                        ) from None


def read_donor_map(split_csvs: list[str | Path]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """slide id -> patient, and the donor split implied by the CSVs (part from name/column)."""
    donors: dict[str, str] = {}
    split: dict[str, list[str]] = {}
    for path in map(Path, split_csvs):
        df = pd.read_csv(check_exists(path, "split CSV"), dtype=str)
        if not {"id", "patient"} <= set(df.columns):
            raise DataError(f"{path}: split CSV needs columns 'id' and 'patient', has "
                            f"{list(df.columns)}")
        for i, row in df.iterrows():
            part = row["split"] if "split" in df.columns else path.stem
            part = normalise_part(part, where=f"{path} row {i + 1}")
            sid, pat = row["id"].strip(), row["patient"].strip()
            if donors.get(sid, pat) != pat:
                raise DataError(f"{path}: slide {sid!r} has patients {donors[sid]!r} and {pat!r}")
            donors[sid] = pat
            split.setdefault(part, []).append(pat)
    return donors, {k: sorted(set(v)) for k, v in split.items()}


def _gexp_rows(col: pa.Array, n_genes: int, where: str) -> sp.csr_matrix:
    rows = []
    for i, v in enumerate(col.to_pylist()):
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
        if arr.size != n_genes:
            raise DataError(f"{where} row {i}: gexp has {arr.size} values but the reference "
                            f"panel has {n_genes} genes; use the panel's own reference h5ad")
        rows.append(arr)
    return sp.csr_matrix(np.stack(rows)) if rows else sp.csr_matrix((0, n_genes))


def _read_table(files: list[Path], genes: pd.Index, donor_map: dict[str, str],
                donor_column: str | None) -> AnnData:
    """Pass 1: everything but the images."""
    mats, frames = [], []
    for path in files:
        cols = None
        offset = 0
        for batch in iter_batches(path):
            cols = cols or [c for c in batch.schema.names if c != "image"]
            t = batch.select(cols)
            if "gexp" not in t.schema.names or "name" not in t.schema.names:
                raise DataError(f"{path}: needs columns 'name' and 'gexp', has {t.schema.names}")
            mats.append(_gexp_rows(t.column("gexp"), len(genes), f"{path} (batch at {offset})"))
            df = t.drop_columns([c for c in ("gexp",) if c in t.schema.names]).to_pandas()
            df["_file"], df["_row"] = str(path), np.arange(offset, offset + len(df))
            frames.append(df)
            offset += len(df)
    obs = pd.concat(frames, ignore_index=True)
    return _build_adata(sp.vstack(mats).tocsr(), obs, genes, donor_map, donor_column)


def _build_adata(X, obs: pd.DataFrame, genes, donor_map, donor_column) -> AnnData:
    slide = obs["name"].astype(str)
    if donor_column:
        donor = obs[donor_column].astype(str)
    else:
        donor = slide.map(donor_map)
        if donor.isna().any():
            i = int(np.flatnonzero(donor.isna().to_numpy())[0])
            raise DataError(f"{obs['_file'][i]} row {obs['_row'][i]}: slide {slide[i]!r} is in "
                            "no split CSV (id,patient); add it or pass donor_column")
    out = pd.DataFrame({"donor": donor.to_numpy(), "slide": slide.to_numpy()})
    for col in obs.columns:
        if col not in SKIP and not col.startswith("_") and col not in out:
            if obs[col].map(lambda v: isinstance(v, (list, np.ndarray, dict, bytes))).any():
                continue
            out[col] = obs[col].astype(str).to_numpy()
    idx = slide + "_" + slide.groupby(slide).cumcount().astype(str)
    out.index = pd.Index(idx.to_numpy())
    adata = AnnData(X=X, obs=out, var=pd.DataFrame(index=genes))
    if "cell_coords" in obs:
        xy = [np.asarray(v, dtype=np.float32).reshape(-1)[:2] for v in obs["cell_coords"]]
        adata.obsm["spatial"] = np.stack(xy)
    adata.uns["_rows"] = obs[["_file", "_row"]].to_numpy()
    return adata


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):
        return value.get("bytes") or b""
    return value


def _decode_images(files: list[Path], size: int | None, progress: bool,
                   writer: DatasetWriter, n: int) -> np.ndarray:
    """Pass 2: decode every image into the store (allocated from the first image)."""
    from PIL import Image
    from tqdm.auto import tqdm

    store: np.ndarray | None = None
    i = 0
    bar = tqdm(total=n, desc="images", disable=not progress)
    for path in files:
        row = 0
        for batch in iter_batches(path, ["image"]):
            for value in batch.column(0).to_pylist():
                img = decode_image(_image_bytes(value), where=f"{path} row {row} (image)")
                if store is None:
                    store = writer.allocate(n, size or img.shape[0])
                if img.shape[:2] != store.shape[1:3]:
                    if size is None:
                        raise DataError(f"{path} row {row}: image is {img.shape[1]} x "
                                        f"{img.shape[0]}, others {store.shape[2]} x "
                                        f"{store.shape[1]}; pass patch_size to resize")
                    img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
                store[i] = img
                i, row = i + 1, row + 1
            bar.update(len(batch))
    bar.close()
    return store


def import_hescape(sources: list[str | Path], out: str | Path, *, reference: str | Path,
                   split_csvs: list[str | Path] = (), donor_column: str | None = None,
                   patch_size: int | None = None, mpp: float | None = None,
                   split: SplitConfig | dict | None = None, progress: bool = True,
                   overwrite: bool = False) -> Path:
    """Import HESCAPE parquet/arrow files; the split comes from the CSVs unless ``split``."""
    files = list_files(list(sources))
    genes = ad.read_h5ad(check_exists(reference, "reference h5ad"), backed="r").var_names
    donor_map, csv_split = read_donor_map(list(split_csvs))
    adata = _read_table(files, pd.Index(genes.astype(str)), donor_map, donor_column)
    adata.uns.pop("_rows")
    donors = adata.obs["donor"].astype(str).unique()
    if split is None and csv_split:
        split_dict = check_split(csv_split, donors, source="split CSVs")
    else:
        split_dict = resolve_split(adata, split or SplitConfig(), source="import_hescape")
    with DatasetWriter(out, overwrite=overwrite) as writer:
        _decode_images(files, patch_size, progress, writer, adata.n_obs)
        return writer.commit(adata, split_dict, source="hescape", mpp=mpp)
