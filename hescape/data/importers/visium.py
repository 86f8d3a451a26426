"""10x Visium Space Ranger output -> canonical dataset (one or many samples).

Per sample: ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions[_list].csv``,
``spatial/scalefactors_json.json`` and an H&E image (the full-resolution TIFF/JPEG/SVS
given as ``image``, or the ``hires``/``lowres`` PNG of the output with its scalefactor).
Patches of ``patch_um`` microns are cut around every in-tissue spot and resized to
``patch_px``; pixel size comes from the 55 um spot diameter. Slides stream one at a time.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hescape.config import SplitConfig
from hescape.data.contract import DatasetWriter, resolve_split
from hescape.data.errors import DataError
from hescape.data.images import SLIDE_MAX_PIXELS, cut_patches, read_image
from hescape.data.importers.common import SPOT_DIAMETER_UM, align_genes, check_exists, concat
from hescape.data.validate import GenePolicy

Resolution = Literal["full", "hires", "lowres"]
POSITION_COLS = ["barcode", "in_tissue", "array_row", "array_col",
                 "pxl_row_in_fullres", "pxl_col_in_fullres"]


@dataclass
class VisiumSample:
    """One Space Ranger output (its ``outs`` dir) and who it belongs to."""

    path: Path
    donor: str
    slide: str
    image: Path | None = None


def read_sample_sheet(path: str | Path) -> list[VisiumSample]:
    """CSV with columns ``path,donor,slide[,image]`` (relative paths: to the sheet)."""
    path = check_exists(path, "sample sheet")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"path", "donor", "slide"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{path}: sample sheet needs columns {sorted(need)} (+ optional image), "
                        f"found {sorted(rows[0]) if rows else 'no rows'}")
    out = []
    for i, row in enumerate(rows):
        if not all((row.get(k) or "").strip() for k in need):
            raise DataError(f"{path}: row {i + 1} has an empty path/donor/slide; fill it in")
        image = (row.get("image") or "").strip()
        out.append(VisiumSample(path=path.parent / row["path"].strip(),
                                donor=row["donor"].strip(), slide=row["slide"].strip(),
                                image=path.parent / image if image else None))
    slides = [s.slide for s in out]
    if len(set(slides)) != len(slides):
        raise DataError(f"{path}: slide names repeat ({slides}); each row needs its own slide")
    return out


def read_10x_h5(path: Path, *, var_names: Literal["symbols", "ids"] = "symbols") -> AnnData:
    """Read a Space Ranger ``filtered_feature_bc_matrix.h5`` (v3 layout) with h5py."""
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(x) for x in m["shape"][:])
            X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
            barcodes = [b.decode() for b in m["barcodes"][:]]
            feats = m["features"]
            names = [b.decode() for b in feats["name"][:]]
            ids = [b.decode() for b in feats["id"][:]]
            ftype = [b.decode() for b in feats["feature_type"][:]] if "feature_type" in feats \
                else ["Gene Expression"] * len(ids)
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: not a readable 10x v3 feature-barcode matrix ({exc}); "
                        "pass Space Ranger's filtered_feature_bc_matrix.h5") from None
    gex = np.array([t == "Gene Expression" for t in ftype])
    var = pd.DataFrame({"gene_ids": ids, "gene_symbols": names})[gex]
    var.index = pd.Index(var["gene_symbols" if var_names == "symbols" else "gene_ids"])
    if var_names == "symbols" and var.index.duplicated().any():
        dups = var.index[var.index.duplicated()].unique()[:5].tolist()
        raise DataError(f"{path}: duplicated gene symbols {dups}; import with var_names='ids' "
                        "(--var-names ids)")
    return AnnData(X=sp.csr_matrix(X.T)[:, np.flatnonzero(gex)],
                   obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)


def read_positions(spatial: Path) -> pd.DataFrame:
    """tissue_positions.csv (with header) or tissue_positions_list.csv (without)."""
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            first = path.open().readline()
            header = 0 if first.startswith("barcode") else None
            df = pd.read_csv(path, header=header)
            if df.shape[1] != 6:
                raise DataError(f"{path}: expected 6 columns {POSITION_COLS}, got {df.shape[1]}")
            df.columns = POSITION_COLS
            return df.set_index("barcode")
    raise DataError(f"{spatial}: no tissue_positions.csv or tissue_positions_list.csv; pass the "
                    "Space Ranger 'outs' directory")


def _image_and_scale(sample: VisiumSample, res: Resolution, scalef: dict) -> tuple[Path, float]:
    if res == "full":
        if sample.image is None:
            raise DataError(f"{sample.path}: no full-resolution image given for slide "
                            f"{sample.slide!r}; pass image= (--image / sample sheet column "
                            "'image') or image_res='hires'/'lowres'")
        return sample.image, 1.0
    key = f"tissue_{res}_scalef"
    if key not in scalef:
        raise DataError(f"{sample.path}: scalefactors_json.json lacks {key!r}")
    return sample.path / "spatial" / f"tissue_{res}_image.png", float(scalef[key])


def _read_sample(sample: VisiumSample, var_names) -> tuple[AnnData, dict]:
    outs = check_exists(sample.path, "Space Ranger output directory")
    adata = read_10x_h5(check_exists(outs / "filtered_feature_bc_matrix.h5", "matrix"),
                        var_names=var_names)
    pos = read_positions(outs / "spatial")
    scalef = json.loads(check_exists(outs / "spatial" / "scalefactors_json.json",
                                     "scalefactors").read_text())
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise DataError(f"{outs}: {len(missing)} barcodes of the matrix (e.g. "
                        f"{list(missing[:3])}) have no row in tissue_positions; wrong spatial dir?")
    pos = pos.loc[adata.obs_names]
    adata = adata[pos["in_tissue"].to_numpy() == 1].copy()
    pos = pos.loc[adata.obs_names]
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float32)
    adata.obs["donor"], adata.obs["slide"] = sample.donor, sample.slide
    adata.obs["barcode"] = adata.obs_names.astype(str)
    adata.obs_names = [f"{sample.slide}_{b}" for b in adata.obs_names]
    return adata, scalef


UPSAMPLE_WARN = 4.0  # warn when patches are upsampled more than this


def _source_px(sample: VisiumSample, scalef: dict, res: Resolution, patch_um: float) -> float:
    """Side in source-image pixels of a ``patch_um`` patch."""
    scale = 1.0 if res == "full" else float(scalef.get(f"tissue_{res}_scalef", 1.0))
    mpp_full = SPOT_DIAMETER_UM / float(scalef["spot_diameter_fullres"])
    return patch_um / (mpp_full / scale)


def _read_all(samples: list[VisiumSample], var_names, res: Resolution) -> list[tuple[AnnData, dict]]:
    """Read every sample's counts and positions and check its image; every problem of every
    sample in one DataError."""
    problems, out = [], []
    for sample in samples:
        try:
            adata, scalef = _read_sample(sample, var_names)
            img, _ = _image_and_scale(sample, res, scalef)
            if not Path(img).is_file():
                raise DataError(f"{img}: H&E image of slide {sample.slide!r} not found")
            if "spot_diameter_fullres" not in scalef:
                raise DataError(f"{sample.path}: scalefactors_json.json lacks "
                                "'spot_diameter_fullres'")
            out.append((adata, scalef))
        except DataError as exc:
            problems.append(f"slide {sample.slide!r}: {exc}")
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"import_visium: {len(problems)} problems:\n" +
                        "\n".join(f"  - {p}" for p in problems))
    return out


def import_visium(samples: list[VisiumSample] | str | Path, out: str | Path, *,
                  patch_um: float = 100.0, patch_px: int = 224, image_res: Resolution = "full",
                  gene_policy: GenePolicy = "error", var_names: Literal["symbols", "ids"] =
                  "symbols", split: SplitConfig | dict | None = None,
                  max_pixels: int = SLIDE_MAX_PIXELS, progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Import Space Ranger outputs (a list, or a sample-sheet CSV) as one canonical dataset."""
    from tqdm.auto import tqdm

    if not isinstance(samples, list):
        samples = read_sample_sheet(samples)
    if not samples:
        raise DataError("import_visium: no samples given")
    read = _read_all(samples, var_names, image_res)  # counts + positions only: cheap
    sides = [_source_px(s, scalef, image_res, patch_um) for s, (_, scalef) in
             zip(samples, read, strict=True)]
    for sample, side in zip(samples, sides, strict=True):
        if side * UPSAMPLE_WARN < patch_px:
            warnings.warn(
                f"import_visium: slide {sample.slide!r}: a {patch_um:g} um patch is {side:.0f} px "
                f"in the {image_res} image and is upsampled to {patch_px} px "
                f"({patch_px / side:.0f}x): the patches hold little real detail. Import from "
                "the full-resolution H&E (image_res='full', --image) or lower patch_px",
                UserWarning, stacklevel=2)
    parts = align_genes({s.slide: a for s, (a, _) in zip(samples, read, strict=True)},
                        gene_policy, source="import_visium")
    adata = concat(parts)
    split_dict = resolve_split(adata, split if split is not None else SplitConfig(),
                               source="import_visium")
    with DatasetWriter(out, overwrite=overwrite) as writer:
        store = writer.allocate(adata.n_obs, patch_px)
        start = 0
        for sample, (a, scalef) in tqdm(list(zip(samples, read, strict=True)), desc="slides",
                                        disable=not progress):
            img_path, scale = _image_and_scale(sample, image_res, scalef)
            image = read_image(img_path, max_pixels=max_pixels)
            mpp_full = SPOT_DIAMETER_UM / float(scalef["spot_diameter_fullres"])
            side = patch_um / (mpp_full / scale)
            store[start:start + a.n_obs] = cut_patches(image, a.obsm["spatial"] * scale, side,
                                                       patch_px)
            start += a.n_obs
            del image
        return writer.commit(adata, split_dict, source="visium", mpp=patch_um / patch_px,
                             extra={"import": {"patch_um": patch_um, "image_res": image_res,
                                               "gene_policy": gene_policy,
                                               "source_px": [round(x, 1) for x in sides]}})
