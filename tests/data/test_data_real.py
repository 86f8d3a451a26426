"""Imports of real data (tests/data/real, see PROVENANCE.md): patches must sit on tissue."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hescape.data import DataError, VisiumSample, import_generic, import_visium, load_paired
from hescape.data.images import read_image


def assert_on_tissue(patches: np.ndarray) -> None:
    """Stained tissue: darker than the white background, red/blue above green (pink/purple)."""
    mean = patches.reshape(len(patches), -1, 3).astype(np.float64).mean(1)
    r, g, b = mean.T
    assert np.median(mean.mean(1)) < 210, mean.mean(0)
    assert np.mean((r > g + 5) & (b > g + 5)) > 0.8, mean[:5]


def test_heart_spaceranger_lowres(real_dir, tmp_path):
    src = real_dir / "visium_human_heart_100spots"
    out = import_visium([VisiumSample(src, "heart1", "heart1_A")], tmp_path / "ds",
                        image_res="lowres", patch_px=32, split={"train": ["heart1"]},
                        progress=False)
    data = load_paired(out)
    assert data.adata.n_obs == 100 and data.adata.n_vars == 100
    assert np.issubdtype(data.adata.X.dtype, np.integer) or np.all(
        data.adata.X.data == np.round(data.adata.X.data))
    assert data.patches.shape == (100, 32, 32, 3)
    assert_on_tissue(np.asarray(data.patches))
    assert data.manifest["mpp"] == pytest.approx(100 / 32)


def test_heart_without_fullres_image_says_so(real_dir, tmp_path):
    src = real_dir / "visium_human_heart_100spots"
    with pytest.raises(DataError, match="no full-resolution image.*image_res"):
        import_visium([VisiumSample(src, "h", "h")], tmp_path / "ds",
                      split={"train": ["h"]}, progress=False)
    assert not (tmp_path / "ds").exists()


def test_mouse_brain_needs_explicit_non_integer_opt_in(real_dir, tmp_path):
    src = real_dir / "visium_mouse_brain_49spots"
    kw = dict(image=src / "test_img.jpg", donor="mouse1", slide="brain_A", patch_px=32,
              split={"train": ["mouse1"]}, progress=False)
    with pytest.raises(DataError, match="not an integer.*allow_non_integer"):
        import_generic(src / "test_data.h5ad", tmp_path / "a", **kw)
    out = import_generic(src / "test_data.h5ad", tmp_path / "b", allow_non_integer=True, **kw)
    data = load_paired(out)
    assert data.manifest["integer_counts"] is False
    assert "NON-INTEGER" in data.describe()
    assert data.patches.shape == (49, 32, 32, 3)
    assert_on_tissue(np.asarray(data.patches))


def test_background_patches_fail_the_tissue_check(real_dir):
    white = np.full((5, 16, 16, 3), 245, dtype=np.uint8)
    with pytest.raises(AssertionError):
        assert_on_tissue(white)


def test_svs_read_and_visium_import_over_it(real_dir, tmp_path):
    svs = real_dir / "he_images" / "cmu_small_region.svs"
    img = read_image(svs)
    assert img.shape == (2967, 2220, 3) and img.dtype == np.uint8
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    _write_matrix(outs / "filtered_feature_bc_matrix.h5", n_spots=12, n_genes=5)
    xs, ys = np.meshgrid(np.linspace(600, 1600, 4), np.linspace(800, 2000, 3))
    rows = [f"BC{i:02d}-1,1,{i // 4},{i % 4},{int(y)},{int(x)}"
            for i, (x, y) in enumerate(zip(xs.ravel(), ys.ravel(), strict=True))]
    (outs / "spatial" / "tissue_positions_list.csv").write_text("\n".join(rows) + "\n")
    spot_px = 55 / 0.499
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": spot_px, "tissue_lowres_scalef": 0.1,
         "tissue_hires_scalef": 0.3}))
    side = int(round(100 / (55 / spot_px)))  # 100 um at 0.499 um/px, no resize
    out = import_visium([VisiumSample(outs, "cmu", "cmu1", image=svs)], tmp_path / "ds",
                        patch_px=side, split={"train": ["cmu"]}, progress=False)
    data = load_paired(out)
    x0, y0 = int(round(xs.ravel()[0] - side / 2)), int(round(ys.ravel()[0] - side / 2))
    np.testing.assert_array_equal(data.patches[0], img[y0:y0 + side, x0:x0 + side])


def _write_matrix(path, *, n_spots: int, n_genes: int) -> None:
    from data_layouts import write_10x_h5

    write_10x_h5(path, np.ones((n_spots, n_genes), dtype=np.int32),
                 [f"BC{i:02d}-1" for i in range(n_spots)], [f"G{g}" for g in range(n_genes)])
