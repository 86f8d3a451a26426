"""Importers on small files written in exactly each source layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from data_layouts import write_hescape, write_hest, write_spaceranger

from hescape.data import (
    DataError,
    VisiumSample,
    import_generic,
    import_hescape,
    import_hest,
    import_visium,
    load_paired,
)

GENES = [f"G{i}" for i in range(7)]


@pytest.mark.parametrize("fmt", ["tif", "jpg", "png"])
def test_visium_single_full_res(tmp_path, fmt):
    img = write_spaceranger(tmp_path / "s1" / "outs", n_spots=10, genes=GENES, image_format=fmt)
    out = import_visium([VisiumSample(tmp_path / "s1" / "outs", "d1", "s1", image=img)],
                        tmp_path / "ds", patch_um=40, patch_px=20, split={"train": ["d1"]},
                        progress=False)
    data = load_paired(out)
    assert data.adata.n_obs == 10 and list(data.adata.var_names) == GENES
    assert data.adata.obs_names[0] == "s1_AAAC0000-1"
    np.testing.assert_allclose(data.adata.obsm["spatial"][1], [110, 60])
    assert data.patches.shape == (10, 20, 20, 3)
    # 40 um at 1 um/px around x=110: green gradient 0..120 over 400 px -> ~33 at the centre
    assert abs(float(data.patches[1, :, :, 1].mean()) - 110 * 120 / 399) < 6
    assert abs(int(data.patches[1, 10, 10, 0]) - 200) < 8


def test_visium_sample_sheet_multi_donor_and_gene_policy(tmp_path):
    write_spaceranger(tmp_path / "a" / "outs", n_spots=10, genes=GENES)
    write_spaceranger(tmp_path / "b" / "outs", n_spots=12, genes=GENES[:-1] + ["EXTRA"], seed=1)
    write_spaceranger(tmp_path / "c" / "outs", n_spots=11, genes=GENES, seed=2)
    sheet = tmp_path / "samples.csv"
    sheet.write_text("path,donor,slide,image\n" + "".join(
        f"{s}/outs,donor_{s},slide_{s},{s}/{s}_fullres.tif\n" for s in "abc"))
    split = {"train": ["donor_a", "donor_b"], "test": ["donor_c"]}
    kw = dict(patch_um=40, patch_px=16, split=split, progress=False)
    with pytest.raises(DataError, match=r"gene panels differ.*slide_b lacks \['G6'\].*"
                       r"gene_policy") as err:
        import_visium(sheet, tmp_path / "x", **kw)
    assert "EXTRA" in str(err.value)
    out = import_visium(sheet, tmp_path / "ds", gene_policy="intersection", **kw)
    data = load_paired(out)
    assert data.adata.n_obs == 33 and list(data.adata.var_names) == GENES[:-1]
    assert data.adata.obs.groupby("donor", observed=True).size().to_dict() == {
        "donor_a": 10, "donor_b": 12, "donor_c": 11}
    assert data.split["test"] == ["donor_c"]
    union = load_paired(import_visium(sheet, tmp_path / "u", gene_policy="union", **kw))
    assert union.adata.n_vars == len(GENES) + 1
    b_rows = (union.adata.obs["slide"] == "slide_b").to_numpy()
    g6 = list(union.adata.var_names).index("G6")
    assert union.adata.X[b_rows][:, g6].sum() == 0


def test_visium_sample_sheet_errors(tmp_path):
    sheet = tmp_path / "samples.csv"
    sheet.write_text("path,donor\nx,d\n")
    with pytest.raises(DataError, match="needs columns.*slide"):
        import_visium(sheet, tmp_path / "o", progress=False)


def test_hest_layout_matches_barcodes(tmp_path):
    write_hest(tmp_path / "hest", {"TENX1": "P1", "TENX2": "P1", "TENX3": "P2"})
    out = import_hest(tmp_path / "hest", tmp_path / "ds",
                      split={"train": ["P1"], "test": ["P2"]}, progress=False)
    data = load_paired(out)
    assert data.adata.n_obs == 36 and data.patches.shape == (36, 24, 24, 3)
    spot = data.adata.obs["barcode"].str.extract(r"BC(\d+)")[0].astype(int).to_numpy()
    np.testing.assert_array_equal(data.patches[:, 0, 0, 0], spot)
    assert set(data.adata.obs["donor"]) == {"P1", "P2"}
    assert set(data.adata.obs["organ"]) == {"Bowel"}


def test_hest_resize_and_gene_policy(tmp_path):
    write_hest(tmp_path / "hest", {"A": "P1", "B": "P2"}, extra_gene="NEW")
    kw = dict(split={"train": ["P1"], "test": ["P2"]}, progress=False)
    with pytest.raises(DataError, match="slide A lacks \\['NEW'\\]"):
        import_hest(tmp_path / "hest", tmp_path / "x", **kw)
    out = import_hest(tmp_path / "hest", tmp_path / "ds", ids=["A", "B"], patch_size=16,
                      gene_policy="intersection", **kw)
    data = load_paired(out)
    assert data.patches.shape[1:] == (16, 16, 3) and "NEW" not in data.adata.var_names
    assert data.manifest["mpp"] == pytest.approx(0.5 * 24 / 16)


@pytest.mark.parametrize("fmt,image_as", [("parquet", "struct"), ("parquet", "bytes"),
                                          ("arrow", "struct")])
def test_hescape_layout(tmp_path, fmt, image_as):
    root = tmp_path / "hescape"
    write_hescape(root, {"S1": 6, "S2": 5, "S3": 7}, fmt=fmt, image_as=image_as)
    out = import_hescape([root], tmp_path / "ds", reference=root / "reference.h5ad",
                         split_csvs=[root / "train.csv", root / "test.csv"], progress=False)
    data = load_paired(out)
    assert data.adata.n_obs == 18 and data.adata.var_names[0] == "GENE0"
    np.testing.assert_array_equal(data.patches[:, 0, 0, 0], np.arange(18))
    assert data.split == {"train": ["P0", "P1"], "val": [], "test": ["P_test"]}
    assert list(data.adata.obs["slide"].unique()) == ["S1", "S2", "S3"]
    assert {"source", "tissue"} <= set(data.adata.obs.columns)
    np.testing.assert_allclose(data.adata.obsm["spatial"][1], [1.0, 2.0])


def test_hescape_undecodable_image_names_the_row(tmp_path):
    root = tmp_path / "hescape"
    write_hescape(root, {"S1": 6, "S2": 5}, bad_row=7)
    with pytest.raises(DataError, match=r"part-0.parquet row 7 \(image\).*cannot be decoded"):
        import_hescape([root], tmp_path / "ds", reference=root / "reference.h5ad",
                       split_csvs=[root / "train.csv", root / "test.csv"], progress=False)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hescape"]


def test_hescape_slide_without_patient(tmp_path):
    root = tmp_path / "hescape"
    write_hescape(root, {"S1": 6, "S2": 5})
    with pytest.raises(DataError, match="slide 'S2' is in no split CSV"):
        import_hescape([root], tmp_path / "ds", reference=root / "reference.h5ad",
                       split_csvs=[root / "train.csv"], progress=False)


def test_generic_h5ad_plus_patches(tiny_path, tmp_path):
    src = load_paired(tiny_path)
    a = src.adata.copy()
    a.obs = a.obs.rename(columns={"donor": "patient", "slide": "section"})
    a.write_h5ad(tmp_path / "x.h5ad")
    np.save(tmp_path / "p.npy", np.asarray(src.patches))
    with pytest.raises(DataError, match="'donor'.*--donor-key"):
        import_generic(tmp_path / "x.h5ad", tmp_path / "o", patches=tmp_path / "p.npy",
                       progress=False)
    out = import_generic(tmp_path / "x.h5ad", tmp_path / "ds", patches=tmp_path / "p.npy",
                         donor_key="patient", slide_key="section", split=src.split,
                         progress=False)
    data = load_paired(out)
    assert data.fingerprint != "" and data.adata.obs["donor"].nunique() == 4
    np.testing.assert_array_equal(data.patches, src.patches)
    assert "state" in data.manifest["label_columns"]
    assert list(data.adata.obs["donor"].astype(str)) == list(pd.Series(
        src.adata.obs["donor"]).astype(str))
