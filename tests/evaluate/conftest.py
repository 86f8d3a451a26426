"""Fixtures for the evaluation tests (data from ``synthetic_data``)."""

from __future__ import annotations

import pytest
from synthetic_data import make_synthetic


@pytest.fixture
def synthetic():
    return make_synthetic()
