"""Fixtures for the data tests: a tiny simulated dataset, the real data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from hescape.data import tiny_dataset

HERE = Path(__file__).parent
REAL = HERE / "real"


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """A tiny canonical dataset (4 donors x 60 spots, 16 px); treat it as read-only."""
    return tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


@pytest.fixture
def real_dir() -> Path:
    return REAL
