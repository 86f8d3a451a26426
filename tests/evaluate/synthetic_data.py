"""Synthetic paired data for the evaluation tests: a shared latent drives image, gene, expression.

A plain module (not conftest) so test files can import it by a name no other test directory
uses; ``from conftest import ...`` resolves to whichever conftest pytest imported first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_synthetic(
    n_donors: int = 6, spots: int = 40, dim: int = 8, genes: int = 30, seed: int = 0
):
    rng = np.random.default_rng(seed)
    n = n_donors * spots
    donors = np.repeat([f"d{i}" for i in range(n_donors)], spots)
    state = rng.integers(0, 3, size=n)
    latent = rng.normal(size=(n, dim)) + 2.0 * np.eye(3, dim)[state]
    obs = pd.DataFrame(
        {
            "donor": donors,
            "slide": [f"{d}_s0" for d in donors],
            "state": [f"s{k}" for k in state],
            "mutation": np.where(np.isin(donors, ["d1", "d3", "d5"]), "mut", "wt"),
        },
        index=[f"spot{i}" for i in range(n)],
    )
    rate = np.exp(latent @ rng.normal(size=(dim, genes)) * 0.5)
    expr = np.log1p(rate)
    counts = np.random.default_rng(seed + 1).poisson(rate).astype(np.float32)  # raw counts
    return {
        "counts": counts,
        "img": latent + 0.3 * rng.normal(size=latent.shape),
        "gene": latent + 0.3 * rng.normal(size=latent.shape),
        "obs": obs,
        "expr_log": expr.astype(np.float32),
        "gene_names": [f"g{i}" for i in range(genes)],
        "frozen": latent[:, :4] + rng.normal(size=(n, 4)),
        "train_idx": np.flatnonzero(np.isin(donors, ["d0", "d1", "d2", "d3"])),
        "test_idx": np.flatnonzero(np.isin(donors, ["d4", "d5"])),
    }
