"""Shared fixtures: one tiny simulated dataset per session, a tiny-model config builder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from hescape.data import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", seed=0,
                        spots_per_donor=120, n_states=4)


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory) -> Path:
    """Enough donors/genes, moderate batch effects: cross-donor retrieval is learnable."""
    from hescape.data import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("data") / "learnable", seed=0, n_donors=5,
                        spots_per_donor=200, n_genes=120, n_states=6, donor_effect=0.5,
                        stain_effect=0.5)


def tiny_config(storage: Path, data: Path, **train: Any):
    """A StudyConfig small enough to train in seconds on one CPU core."""
    from hescape.config import StudyConfig, _deep_merge

    base = {
        "name": "t", "storage_dir": str(storage), "data": {"path": str(data)},
        "model": {"embed_dim": 32, "gene": {"hidden_dim": 64}},
        "train": {"batch_size": 32, "max_steps": 40, "eval_every": 10, "warmup_steps": 5,
                  "lr": 3e-3, "keep_checkpoints": 10},
        "eval": {"inbatch_repeats": 2},
    }
    extra = train.pop("extra", {})
    return StudyConfig.model_validate(_deep_merge(_deep_merge(base, {"train": train}), extra))


@pytest.fixture
def make_cfg(tmp_path, tiny_data):
    def _make(data: Path | None = None, **train: Any):
        return tiny_config(tmp_path / "runs", data or tiny_data, **train)

    return _make
