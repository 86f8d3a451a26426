"""Fixtures for the preprocessing tests: the real STARmap sections, small simulated sets."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

STARMAP = Path(__file__).parents[1] / "data" / "real" / "starmap_mpfc_3sections.h5ad"


@pytest.fixture(scope="session")
def starmap() -> ad.AnnData:
    """STARmap mPFC: 3,704 cells x 158 genes, raw counts, 3 sections in obs["batch"]."""
    return ad.read_h5ad(STARMAP)


@pytest.fixture
def toy() -> ad.AnnData:
    """60 spots x 12 genes of integer counts, 3 donors, 2 labels."""
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(3.0, size=(60, 12)).astype(np.float32))
    a.obs["donor"] = np.repeat(["d0", "d1", "d2"], 20)
    a.obs["state"] = np.tile(["a", "b"], 30)
    a.obs_names = [f"s{i}" for i in range(60)]
    a.var_names = [f"g{i}" for i in range(12)]
    return a
