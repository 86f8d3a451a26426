"""Writers of small files in exactly each source layout (for the importer tests)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from PIL import Image


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """Space Ranger v3 ``filtered_feature_bc_matrix.h5`` (genes x barcodes CSC)."""
    m = sp.csc_matrix(np.asarray(counts).T)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feats = g.create_group("features")
        feats["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")


def spot_image(colour: tuple[int, int, int], size: int = 400) -> np.ndarray:
    """A full-res 'H&E' image of one colour with a gradient (so crops differ)."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[:] = colour
    img[..., 1] = np.linspace(0, 120, size, dtype=np.uint8)[None, :]
    return img


def write_spaceranger(outs: Path, *, n_spots: int, genes: list[str], seed: int = 0,
                      image_format: str = "tif", colour=(200, 100, 180)) -> Path:
    """A Space Ranger outs/ dir (v2 tissue_positions.csv with header) and its full-res image.

    Returns the image path. Spots sit on a grid inside a 400 px image at 1 um/px.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    (outs / "spatial").mkdir(parents=True)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n_spots)]
    counts = rng.poisson(3.0, (n_spots, len(genes))).astype(np.int32)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, genes)
    rows = [(b, 1, i // 5, i % 5, 60 + 50 * (i // 5), 60 + 50 * (i % 5))
            for i, b in enumerate(barcodes)]
    rows.append(("TTTT0000-1", 0, 9, 9, 380, 380))  # an off-tissue spot, not in the matrix
    pd.DataFrame(rows, columns=["barcode", "in_tissue", "array_row", "array_col",
                                "pxl_row_in_fullres", "pxl_col_in_fullres"]).to_csv(
        outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 55.0, "tissue_hires_scalef": 0.5,
         "tissue_lowres_scalef": 0.25, "fiducial_diameter_fullres": 89.0}))
    img = spot_image(colour)
    Image.fromarray(img[::4, ::4]).save(outs / "spatial" / "tissue_lowres_image.png")
    path = outs.parent / f"{outs.parent.name}_fullres.{image_format}"
    if image_format == "tif":
        tifffile.imwrite(path, img)
    else:
        Image.fromarray(img).save(path)
    return path


def write_hest(root: Path, samples: dict[str, str], *, n_spots: int = 12, size: int = 24,
               genes: list[str] | None = None, extra_gene: str | None = None) -> None:
    """HEST-1k: st/<id>.h5ad, patches/<id>.h5 (shuffled, extra barcodes), metadata CSV.

    Patch pixel [0, 0, 0] encodes the spot index, so matching can be checked.
    """
    (root / "st").mkdir(parents=True)
    (root / "patches").mkdir()
    genes = genes or [f"G{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    for sid in samples:
        g = genes + ([extra_gene] if extra_gene and sid == list(samples)[-1] else [])
        barcodes = [f"{sid}-BC{i:03d}" for i in range(n_spots)]
        a = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n_spots, len(g))).astype(np.float32)),
                       obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=g))
        a.obsm["spatial"] = rng.uniform(0, 1000, (n_spots, 2))
        a.write_h5ad(root / "st" / f"{sid}.h5ad")
        order = rng.permutation(n_spots + 3)  # 3 patches without a spot
        bc = np.array([f"{sid}-BC{i:03d}" for i in order], dtype="S")[:, None]
        img = np.zeros((len(order), size, size, 3), dtype=np.uint8)
        img[:, 0, 0, 0] = order
        img[:, 1:, 1:] = (180, 90, 170)
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"], f["barcode"] = img, bc
            f["coords"] = rng.integers(0, 1000, (len(order), 2))
    pd.DataFrame({"id": list(samples), "patient": list(samples.values()), "organ": "Bowel",
                  "oncotree_code": "COAD"}).to_csv(root / "HEST_v1_metadata.csv", index=False)


def png_bytes(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    img = np.full((size, size, 3), (200, 120, 190), dtype=np.uint8)
    img[0, 0, 0] = value
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_hescape(root: Path, slides: dict[str, int], *, n_genes: int = 8,
                  bad_row: int | None = None, fmt: str = "parquet",
                  image_as: str = "struct") -> pa.Table:
    """HESCAPE rows (name, image struct/bytes, gexp (1, G), cell_coords, source, tissue) +
    reference h5ad + split CSVs (train.csv / test.csv with id, patient)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for name, n in slides.items():
        for i in range(n):
            k = len(rows)
            data = png_bytes(k) if k != bad_row else b"not an image"
            image = {"bytes": data, "path": None} if image_as == "struct" else data
            rows.append({"name": name, "image": image,
                         "gexp": rng.poisson(2.0, (1, n_genes)).astype(float).tolist(),
                         "cell_coords": [float(i), float(2 * i)], "source": "10x",
                         "tissue": "bowel", "id": f"{name}_{i}"})
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(table, root / "part-0.parquet", row_group_size=5)
    else:
        with pa.OSFile(str(root / "data-00000.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=5)
    ad.AnnData(X=np.zeros((1, n_genes), dtype=np.float32),
               var=pd.DataFrame(index=[f"GENE{g}" for g in range(n_genes)])).write_h5ad(
        root / "reference.h5ad")
    names = list(slides)
    pd.DataFrame({"id": names[:-1], "patient": [f"P{i}" for i in range(len(names) - 1)]}
                 ).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": names[-1:], "patient": ["P_test"]}).to_csv(root / "test.csv",
                                                                   index=False)
    return table
