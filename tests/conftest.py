"""Shared test set-up: offline, headless, few threads (the CI machine has 2 cores)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's own temp dir for this test session: ray.init() without an address joins the newest
# Ray it finds under $RAY_TMPDIR (default /tmp/ray), e.g. a user's `ray start` or another test
# session on this machine; then every local ray.init(num_cpus=...) fails ("When connecting to
# an existing cluster ..."). A short path: Ray's socket paths must fit in 107 bytes.
if "RAY_TMPDIR" not in os.environ and "RAY_ADDRESS" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="hr", dir="/tmp")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield
