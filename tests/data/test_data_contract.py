"""The canonical dataset: atomic write, load, fingerprint, PairedData views."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hescape.config import SplitConfig
from hescape.data import DataError, DatasetWriter, load_paired, write_dataset
from hescape.data.contract import MANIFEST, PATCHES


def test_load_views_align(tiny_path):
    data = load_paired(tiny_path, verify=True)
    assert data.patches.shape == (240, 16, 16, 3) and data.patches.dtype == np.uint8
    assert isinstance(data.patches, np.memmap)
    assert data.adata.n_obs == 240 and data.manifest["n_vars"] == 40
    assert set(data.adata.obs.columns) >= {"donor", "slide", "state", "mutation", "tissue"}
    assert data.adata.obsm["spatial"].shape == (240, 2)
    parts = data.part_of()
    for part, donors in data.split.items():
        idx = data.indices(part)
        assert set(data.adata.obs["donor"].iloc[idx].astype(str)) == set(donors)
        assert (parts[idx] == part).all()
    assert sum(len(data.indices(p)) for p in ("train", "val", "test")) == 240
    text = data.describe()
    for word in ("D00", "train", "state", "genes 40"):
        assert word in text


def test_manifest_fields(tiny_path):
    manifest = json.loads((tiny_path / MANIFEST).read_text())
    for key in ("fingerprint", "n_obs", "n_vars", "patch_size", "mpp", "split",
                "label_columns", "source", "format_version"):
        assert key in manifest
    assert manifest["label_columns"] == ["state", "mutation", "tissue"]


def test_roundtrip_fingerprint_is_content_not_path(tiny_path, tmp_path):
    data = load_paired(tiny_path)
    out = write_dataset(tmp_path / "copy", data.adata, np.asarray(data.patches),
                        split=data.split, source="copy", progress=False)
    assert load_paired(out).fingerprint == data.fingerprint
    patches = np.array(data.patches)
    patches[7, 3, 3, 1] ^= 1
    out2 = write_dataset(tmp_path / "changed", data.adata, patches, split=data.split,
                         source="copy", progress=False)
    assert load_paired(out2).fingerprint != data.fingerprint
    adata = data.adata.copy()
    adata.X = adata.X.copy()
    adata.X.data[0] += 1
    out3 = write_dataset(tmp_path / "counts", adata, np.asarray(data.patches),
                         split=data.split, source="copy", progress=False)
    assert load_paired(out3).fingerprint != data.fingerprint


def test_interrupted_write_leaves_nothing(tiny_path, tmp_path):
    data = load_paired(tiny_path)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError), DatasetWriter(out) as writer:
        writer.allocate(data.adata.n_obs, 16)[:] = 0
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="not found"):
        load_paired(out)


def test_half_written_dir_does_not_load(tiny_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    (broken / MANIFEST).unlink()
    with pytest.raises(DataError, match="manifest.json: missing"):
        load_paired(broken)


def test_overwrite_is_explicit(tiny_path, tmp_path):
    data = load_paired(tiny_path)
    kw = dict(split=data.split, source="t", progress=False)
    out = write_dataset(tmp_path / "ds", data.adata, np.asarray(data.patches), **kw)
    with pytest.raises(DataError, match="already exists"):
        write_dataset(out, data.adata, np.asarray(data.patches), **kw)
    write_dataset(out, data.adata, np.asarray(data.patches), overwrite=True, **kw)
    assert load_paired(out).adata.n_obs == 240
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_split_config_and_verify(tiny_path, tmp_path):
    data = load_paired(tiny_path)
    out = write_dataset(tmp_path / "ds", data.adata, np.asarray(data.patches),
                        split=SplitConfig(seed=3), source="t", progress=False)
    loaded = load_paired(out)
    assert sorted(sum(loaded.split.values(), [])) == ["D00", "D01", "D02", "D03"]
    patches = np.load(out / PATCHES, mmap_mode="r+")
    patches[0, 0, 0, 0] ^= 255
    patches.flush()
    del patches
    with pytest.raises(DataError, match="fingerprint"):
        load_paired(out, verify=True)


def test_image_only_dataset(tiny_path, tmp_path):
    data = load_paired(tiny_path)
    img_only = data.adata[:, []].copy()
    out = write_dataset(tmp_path / "img", img_only, np.asarray(data.patches),
                        split=data.split, source="t", progress=False)
    with pytest.raises(DataError, match="require_expression=False"):
        load_paired(out)
    loaded = load_paired(out, require_expression=False)
    assert loaded.adata.n_vars == 0 and "mutation" in loaded.adata.obs
