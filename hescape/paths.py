"""Where things live on disk: the one home for every root derived from ``storage_dir``.

``storage_dir`` may be relative or start with ``~``; every path below is absolute, with
``~`` expanded, so a study run from another directory (or on another node of a shared
filesystem) finds the same files, and ``storage_dir: ~/runs`` never becomes ``./~/runs``.

Layout::

    <storage_dir>/
      mlflow.db                 default MLflow store (hescape.tracking)
      mlartifacts/<experiment>/ default MLflow artifact root
      cache/data/               simulated datasets
      cache/preprocess/         preprocessed expression (content-addressed)
      cache/features/           frozen image-encoder features
      <study name>/             one directory per study (trials, tune state, report)
      train/<name>/             `hescape train` runs
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

CacheKind = Literal["data", "preprocess", "features"]


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` expanded, made absolute (symlinks resolved)."""
    return Path(path).expanduser().resolve()


def storage_root(storage_dir: str | os.PathLike[str]) -> Path:
    """The absolute storage root."""
    return absolute(storage_dir)


def mlflow_db(storage_dir: str | os.PathLike[str]) -> Path:
    """``<storage_dir>/mlflow.db``: the default MLflow store (sqlite)."""
    return storage_root(storage_dir) / "mlflow.db"


def artifact_root(storage_dir: str | os.PathLike[str]) -> Path:
    """``<storage_dir>/mlartifacts``: the default MLflow artifact root."""
    return storage_root(storage_dir) / "mlartifacts"


def cache_dir(storage_dir: str | os.PathLike[str], kind: CacheKind | None = None) -> Path:
    """``<storage_dir>/cache`` or one of its kinds (not created here)."""
    root = storage_root(storage_dir) / "cache"
    return root if kind is None else root / kind


def study_dir(storage_dir: str | os.PathLike[str], name: str) -> Path:
    """``<storage_dir>/<study name>``."""
    return storage_root(storage_dir) / name


def train_dir(storage_dir: str | os.PathLike[str], name: str) -> Path:
    """``<storage_dir>/train/<run name>`` (``hescape train``)."""
    return storage_root(storage_dir) / "train" / name
