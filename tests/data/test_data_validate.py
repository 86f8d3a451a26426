"""Every malformed input gets a DataError naming the file, the row/column and the fix."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from PIL import Image

from hescape.config import SplitConfig
from hescape.data import DataError, harmonise_genes, load_paired, write_dataset
from hescape.data.images import decode_image, read_image


def _adata(n: int = 12, g: int = 5, sparse: bool = True) -> AnnData:
    x = np.random.default_rng(0).poisson(2, (n, g)).astype(np.float32)
    obs = pd.DataFrame({"donor": ["a"] * (n // 2) + ["b"] * (n - n // 2), "slide": "s"},
                       index=[f"c{i}" for i in range(n)])
    return AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs,
                   var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


def _patches(n: int = 12, size: int = 16) -> np.ndarray:
    return np.full((n, size, size, 3), 128, dtype=np.uint8)


SPLIT = {"train": ["a"], "test": ["b"]}


def _write(tmp_path, adata, patches=None, split=SPLIT):
    return write_dataset(tmp_path / "ds", adata, _patches() if patches is None else patches,
                         split=split, source="test", progress=False)


def _set(adata: AnnData, r: int, c: int, value: float) -> AnnData:
    x = adata.X.toarray() if sp.issparse(adata.X) else adata.X.copy()
    x[r, c] = value
    adata.X = sp.csr_matrix(x) if sp.issparse(adata.X) else x
    return adata


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("value,what", [(np.nan, "NaN/inf"), (np.inf, "NaN/inf"),
                                        (-3.0, "negative"), (2.5, "not an integer")])
def test_bad_counts_name_row_and_column(tmp_path, sparse, value, what):
    adata = _set(_adata(sparse=sparse), 4, 2, value)
    with pytest.raises(DataError, match=rf"row 4 \(obs 'c4'\), column 2 \(gene 'g2'\) is {what}"
                       ) as err:
        _write(tmp_path, adata)
    assert str(tmp_path / "ds") in str(err.value)
    assert not (tmp_path / "ds").exists()


def test_non_integer_allowed_only_explicitly(tmp_path):
    adata = _set(_adata(), 1, 1, 0.5)
    with pytest.raises(DataError, match="allow_non_integer"):
        _write(tmp_path, adata)
    out = write_dataset(tmp_path / "ok", adata, _patches(), split=SPLIT, source="t",
                        progress=False, integer_counts=False)
    assert load_paired(out).manifest["integer_counts"] is False


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicated_names(tmp_path, axis):
    adata = _adata()
    if axis == "obs":
        adata.obs_names = ["c0", "c1", "c0"] + [f"x{i}" for i in range(9)]
    else:
        adata.var_names = ["g0", "g1", "g1", "g3", "g4"]
    with pytest.raises(DataError, match=rf"duplicated {axis} names.*{axis}_names_make_unique"):
        _write(tmp_path, adata)


@pytest.mark.parametrize("col", ["donor", "slide"])
def test_missing_donor_or_slide(tmp_path, col):
    adata = _adata()
    del adata.obs[col]
    with pytest.raises(DataError, match=rf"obs column '{col}' is missing.*--{col}-key"):
        _write(tmp_path, adata)
    adata = _adata()
    adata.obs[col] = adata.obs[col].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc(col)] = None
    with pytest.raises(DataError, match=rf"'{col}' is empty at row 3 \(obs 'c3'\)"):
        _write(tmp_path, adata)


@pytest.mark.parametrize("patches,match", [
    (np.zeros((11, 16, 16, 3), np.uint8), "11 patches but 12 obs rows"),
    (np.zeros((12, 16, 16, 3), np.float32), "dtype float32; expected uint8"),
    (np.zeros((12, 16, 16, 4), np.uint8), "4 channels"),
    (np.zeros((12, 3, 16, 16), np.uint8), "3 channels|16 channels|square"),
    (np.zeros((12, 16, 20, 3), np.uint8), "16 x 20; expected square"),
    (np.zeros((12, 16, 16), np.uint8), r"shape \(12, 16, 16\); expected N x H x W x 3"),
])
def test_bad_patches(tmp_path, patches, match):
    with pytest.raises(DataError, match=match):
        _write(tmp_path, _adata(), patches)


def test_patch_count_mismatch_on_disk_is_caught_at_load(tmp_path):
    out = _write(tmp_path, _adata())
    np.save(out / "patches.npy", _patches(10))
    with pytest.raises(DataError, match=r"patches.npy: 10 patches but 12 obs rows"):
        load_paired(out)


def test_donor_with_too_few_spots(tmp_path):
    with pytest.raises(DataError, match=r"too few spots.*'a': 6"):
        write_dataset(tmp_path / "ds", _adata(), _patches(), source="t", progress=False,
                      split=SplitConfig(min_spots_per_donor=7))


@pytest.mark.parametrize("split,match", [
    ({"train": ["a"], "test": ["b", "zz"]}, r"donors not in the data: \['zz'\]"),
    ({"train": ["a", "b"], "test": ["b"]}, r"donor 'b' is in both 'train' and 'test'"),
])
def test_split_errors(tmp_path, split, match):
    with pytest.raises(DataError, match=match):
        _write(tmp_path, _adata(), split=split)


def test_split_file_unknown_donor(tmp_path):
    f = tmp_path / "split.csv"
    f.write_text("donor,split\na,train\nb,test\nc,val\n")
    with pytest.raises(DataError, match=r"split.csv: names donors not in the data: \['c'\]"):
        write_dataset(tmp_path / "ds", _adata(), _patches(), source="t", progress=False,
                      split=SplitConfig(file=str(f), min_spots_per_donor=1))


def test_gene_panels_policy():
    a, b = _adata(), _adata()
    b.var_names = ["g0", "g1", "g2", "g3", "NEW"]
    with pytest.raises(DataError, match=r"slide s1 lacks \['NEW'\]; slide s2 lacks \['g4'\]"):
        harmonise_genes({"s1": a, "s2": b}, "error")
    assert harmonise_genes({"s1": a, "s2": b}, "intersection")[0] == ["g0", "g1", "g2", "g3"]
    assert harmonise_genes({"s1": a, "s2": b}, "union")[0][-2:] == ["g4", "NEW"]


def _jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_undecodable_truncated_and_bomb_images(tmp_path):
    assert decode_image(_jpeg(), where="x").shape == (64, 64, 3)
    with pytest.raises(DataError, match=r"rows.parquet row 5.*cannot be decoded"):
        decode_image(b"\x89PNG garbage", where="rows.parquet row 5")
    with pytest.raises(DataError, match="row 9.*truncated"):
        decode_image(_jpeg()[:300], where="row 9")
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000), (255, 255, 255)).save(buf, "PNG")  # tiny file, 9 Mpx
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(DataError, match="decompression bomb"):
        decode_image(buf.getvalue(), where="row 1", max_pixels=1_000_000)
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"bomb.png.*decompression bomb.*max_pixels"):
        read_image(tmp_path / "bomb.png", max_pixels=1_000_000)
    (tmp_path / "cut.jpg").write_bytes(_jpeg((200, 200))[:500])
    with pytest.raises(DataError, match=r"cut.jpg.*truncated"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(DataError, match=r"cut.tif: cannot read TIFF"):
        read_image(tmp_path / "cut.tif")
