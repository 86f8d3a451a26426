"""Macenko normalisation on a real H&E tile; HED jitter identity and determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hescape.preprocess import MacenkoNormalizer, hed_jitter

ROOT = Path(__file__).parents[2]
# the TIAToolbox H&E target tile (developer check, ../shared/realdata) or, in the repository,
# a 1000 px tissue crop of the real CMU-1 SVS region (tests/data/real, see PROVENANCE.md)
TIA_TILE = ROOT.parent / "shared" / "realdata" / "he_images" / "tiatoolbox_target_he_1000px.png"
SVS = ROOT / "tests" / "data" / "real" / "he_images" / "cmu_small_region.svs"


@pytest.fixture(scope="module", params=["tiatoolbox", "svs"])
def tile(request) -> np.ndarray:
    if request.param == "tiatoolbox":
        if not TIA_TILE.is_file():
            pytest.skip(f"{TIA_TILE} not present (developer-only real tile)")
        return np.asarray(Image.open(TIA_TILE).convert("RGB"))
    import tifffile

    return np.ascontiguousarray(tifffile.imread(SVS)[600:1600, 600:1600])


def _patches(x: np.ndarray, size: int = 100) -> np.ndarray:
    h, w = (x.shape[0] // size) * size, (x.shape[1] // size) * size
    x = x[:h, :w]
    return x.reshape(h // size, size, w // size, size, 3).swapaxes(1, 2).reshape(-1, size, size, 3)


def _tissue(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 3).mean(1) < 220


def _colour_stats(x: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    px = x.reshape(-1, 3).astype(float)[tissue]  # the same pixels before and after
    return np.r_[px.mean(0), px.std(0)]


def _stain_shift(x: np.ndarray) -> np.ndarray:
    """A different scanner/stain look: per-channel gamma (more purple, less pink)."""
    return np.clip(255 * (x / 255.0) ** np.array([1.6, 0.7, 1.2]), 0, 255).astype(np.uint8)


def test_macenko_moves_shifted_tile_back(tile):
    """Fit on the real tile, normalise a stain-shifted copy: it comes back towards the tile."""
    ref = _patches(tile)
    norm = MacenkoNormalizer().fit(ref[::2])  # "training" patches: every other one
    shifted = _stain_shift(ref)
    out = norm.transform(shifted)
    assert out.dtype == np.uint8 and out.shape == shifted.shape
    mask = _tissue(ref)
    target = _colour_stats(ref, mask)
    before = np.linalg.norm(_colour_stats(shifted, mask) - target)
    after = np.linalg.norm(_colour_stats(out, mask) - target)
    assert after < 0.5 * before, (before, after)  # measured: TIA 50 -> 5, CMU-1 48 -> 21


def test_macenko_background_and_single_image(tile):
    norm = MacenkoNormalizer().fit(_patches(tile[:500, :500]))
    blank = np.full((3, 32, 32, 3), 245, np.uint8)
    assert np.array_equal(norm.transform(blank), blank) and norm.n_skipped == 3
    one = tile[:64, :64]
    assert norm.transform(one).shape == one.shape


def test_macenko_errors():
    with pytest.raises(RuntimeError, match="before fit"):
        MacenkoNormalizer().transform(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="tissue pixels"):
        MacenkoNormalizer().fit(np.full((2, 8, 8, 3), 250, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        MacenkoNormalizer().fit(np.zeros((2, 8, 8, 3), np.float32))


def test_hed_jitter_identity_and_determinism(tile):
    x = torch.from_numpy(_patches(tile, 64)[:8]).permute(0, 3, 1, 2).float() / 255
    assert hed_jitter(x, 0.0, torch.Generator().manual_seed(0)) is x
    a = hed_jitter(x, 0.05, torch.Generator().manual_seed(1))
    b = hed_jitter(x, 0.05, torch.Generator().manual_seed(1))
    c = hed_jitter(x, 0.05, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    diff = (a - x).abs().mean()
    assert 0 < diff < 0.1  # a colour jitter, not a different image
    assert (hed_jitter(x, 0.2, torch.Generator().manual_seed(1)) - x).abs().mean() > diff
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        hed_jitter(x[0], 0.1)
