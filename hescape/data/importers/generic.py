"""Generic import: an h5ad plus either a patch array (.npy) or an H&E image to cut from.

Column options name the donor/slide columns; a single-slide file can take fixed
``donor=``/``slide=`` values. Normalised (non-integer) expression needs an explicit
``allow_non_integer=True`` and is marked as such in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData

from hescape.config import SplitConfig
from hescape.data.contract import DatasetWriter, resolve_split
from hescape.data.errors import DataError
from hescape.data.images import SLIDE_MAX_PIXELS, cut_patches, read_image
from hescape.data.importers.common import SPOT_DIAMETER_UM, check_exists, counts_matrix
from hescape.data.validate import validate_adata, validate_patches


def _obs_column(adata: AnnData, key: str, fixed: str | None, *, file: str, role: str) -> None:
    if fixed is not None:
        adata.obs[role] = fixed
        return
    if key not in adata.obs.columns:
        raise DataError(f"{file}: obs column {key!r} (the {role}) is missing; columns are "
                        f"{list(adata.obs.columns)}: pass --{role}-key COLUMN or --{role} VALUE")
    adata.obs[role] = adata.obs[key].astype(str).where(adata.obs[key].notna())


def read_expression(h5ad: str | Path, *, donor_key: str = "donor", slide_key: str = "slide",
                    donor: str | None = None, slide: str | None = None,
                    counts_layer: str | None = None, allow_non_integer: bool = False,
                    keep_obs: list[str] | None = None) -> AnnData:
    """Read an h5ad into the canonical obs layout (donor, slide, labels) and validate it."""
    path = check_exists(h5ad, "h5ad file")
    try:
        src = ad.read_h5ad(path)
    except OSError as exc:  # not HDF5 / truncated: name the file, not just h5py's message
        raise DataError(f"{path}: cannot read as .h5ad ({exc}); is it an AnnData file?") from None
    file = str(path)
    X = counts_matrix(src, layer=counts_layer, file=file)
    obs = src.obs.copy()
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=src.var_names.astype(str)))
    _obs_column(adata, donor_key, donor, file=file, role="donor")
    _obs_column(adata, slide_key, slide, file=file, role="slide")
    keep = ["donor", "slide"] + [c for c in (keep_obs or []) if c in obs.columns]
    if keep_obs is None:
        keep += [c for c in obs.columns if c not in (donor_key, slide_key, "donor", "slide")]
    adata.obs = adata.obs[list(dict.fromkeys(keep))]
    if "spatial" in src.obsm:
        adata.obsm["spatial"] = np.asarray(src.obsm["spatial"], dtype=np.float32)[:, :2]
    adata.uns["spatial_meta"] = _scalefactors(src)
    validate_adata(adata, file=file, integer=not allow_non_integer)
    return adata


def _scalefactors(src: AnnData) -> dict:
    spatial = src.uns.get("spatial", {})
    for lib in spatial.values():
        if isinstance(lib, dict) and "scalefactors" in lib:
            return {k: float(v) for k, v in lib["scalefactors"].items()}
    return {}


def import_generic(h5ad: str | Path, out: str | Path, *, patches: str | Path | None = None,
                   image: str | Path | None = None, mpp: float | None = None,
                   patch_um: float = 100.0, patch_px: int = 224, donor_key: str = "donor",
                   slide_key: str = "slide", donor: str | None = None, slide: str | None = None,
                   counts_layer: str | None = None, allow_non_integer: bool = False,
                   split: SplitConfig | dict | None = None, max_pixels: int = SLIDE_MAX_PIXELS,
                   progress: bool = True, overwrite: bool = False) -> Path:
    """Import an h5ad with a patch array (rows in obs order) or an image cut at obsm['spatial'].

    With ``image``, pixel size is ``mpp`` or else 55 um / ``spot_diameter_fullres`` from
    ``uns['spatial']``; ``obsm['spatial']`` must be (x, y) in that image's pixels.
    """
    if (patches is None) == (image is None):
        raise DataError("import: give exactly one of patches= (a .npy N x H x W x 3) or image= "
                        "(an H&E image to cut patches from)")
    adata = read_expression(h5ad, donor_key=donor_key, slide_key=slide_key, donor=donor,
                            slide=slide, counts_layer=counts_layer,
                            allow_non_integer=allow_non_integer)
    meta = adata.uns.pop("spatial_meta", {})
    split_dict = resolve_split(adata, split if split is not None else SplitConfig(),
                               source=str(h5ad))
    if patches is not None:
        arr = np.load(check_exists(patches, "patch array"), mmap_mode="r")
        validate_patches(arr, adata.n_obs, file=str(patches))
        size, out_mpp = arr.shape[1], mpp
    else:
        if "spatial" not in adata.obsm:
            raise DataError(f"{h5ad}: no obsm['spatial']; patches cannot be cut from the image")
        if mpp is None and "spot_diameter_fullres" not in meta:
            raise DataError(f"{h5ad}: pixel size unknown (no uns['spatial'] scalefactors); pass "
                            "mpp= (--mpp, microns per pixel of the image)")
        mpp = mpp or SPOT_DIAMETER_UM / meta["spot_diameter_fullres"]
        size, out_mpp = patch_px, patch_um / patch_px
    with DatasetWriter(out, overwrite=overwrite) as writer:
        store = writer.allocate(adata.n_obs, size)
        if patches is not None:
            for start in range(0, adata.n_obs, 1024):
                store[start:start + 1024] = arr[start:start + 1024]
        else:
            img = read_image(image, max_pixels=max_pixels)
            store[:] = cut_patches(img, adata.obsm["spatial"], patch_um / mpp, patch_px)
        return writer.commit(adata, split_dict, source="generic", mpp=out_mpp,
                             integer_counts=not allow_non_integer)
