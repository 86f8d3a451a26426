"""Inputs of a training run: prepared once by the driver, loaded by every worker.

Driver side (``prepare_inputs``): resolve the dataset (``data.path`` or the simulator, cached
under ``<storage_dir>/cache/data``), the preprocessed expression (``hescape.preprocess``'s
content-addressed cache) and, for a frozen image tower, the feature cache. Workers get
only the resulting paths (``load_train_inputs``) and never recompute any of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from hescape.config import StudyConfig
from hescape.paths import absolute, cache_dir
from hescape.train.dataset import Collate, PairedDataset, ResumableSampler, donor_codes
from hescape.train.device import resolve_device

STAIN_FIT_PATCHES = 256


def cache_root(cfg: StudyConfig) -> Path:
    """``<storage_dir>/cache`` (absolute, ``~`` expanded: ``hescape.paths``)."""
    return cache_dir(cfg.storage_dir)


def simulated_dataset_path(cfg: StudyConfig) -> Path:
    """Where the simulated dataset of ``cfg`` is cached (it may not exist yet)."""
    from hescape.data.simulate import SIMULATOR_VERSION

    # the simulator's version is part of the key: a changed simulator never reuses old data
    spec = {"simulate": cfg.data.simulate.model_dump(), "split": cfg.data.split.model_dump(),
            "version": SIMULATOR_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(cfg.storage_dir, "data") / f"sim-{key}"


def resolve_dataset(cfg: StudyConfig, *, progress: bool = True) -> Path:
    """The dataset directory: ``data.path``, or the simulated dataset (simulated once)."""
    if cfg.data.path:
        return absolute(cfg.data.path)
    from filelock import FileLock

    from hescape.data.simulate import simulate

    out = simulated_dataset_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            simulate(out, cfg.data.simulate, split=cfg.data.split, progress=progress,
                     overwrite=out.exists())
    return out


def prepare_expression(cfg: StudyConfig, paired: Any, *, progress: bool = True) -> Any:
    """The PreparedExpression of ``paired`` for ``cfg`` (from the cache, computed once)."""
    from hescape.preprocess import prepare

    return prepare(paired, cfg.preprocess.expression, batch_key=cfg.data.batch_key,
                   cache_dir=cache_dir(cfg.storage_dir, "preprocess"), progress=progress)


def prepared_entry_path(cfg: StudyConfig, prepared: Any) -> Path:
    """Where ``hescape.preprocess`` stored ``prepared`` (the entry base, no suffix)."""
    return entry_path(cfg, prepared.method, prepared.cache_key)


def entry_path(cfg: StudyConfig, method: str, cache_key: str) -> Path:
    """The preprocessing cache entry (base, no suffix) of a variant's method and key."""
    return cache_dir(cfg.storage_dir, "preprocess") / f"expr-{method}-{cache_key}"


def fit_stain(cfg: StudyConfig, paired: Any) -> Any:
    """A Macenko normaliser fitted on a fixed sample of training patches (or None)."""
    if cfg.preprocess.image.stain_norm == "none":
        return None
    from hescape.preprocess import MacenkoNormalizer

    rows = paired.indices("train")
    if len(rows) > STAIN_FIT_PATCHES:
        rows = np.sort(np.random.default_rng(0).choice(rows, STAIN_FIT_PATCHES, replace=False))
    normaliser = MacenkoNormalizer()
    normaliser.fit(np.asarray(paired.patches[rows]))
    return normaliser


def prepare_inputs(
    cfg: StudyConfig, *, prepared_path: str | Path | None = None,
    features_path: str | Path | None = None, progress: bool = True,
) -> dict[str, str | None]:
    """Driver side: dataset + preprocessed expression (+ features) -> paths for workers."""
    from hescape.data import load_paired
    from hescape.data.splits import with_fold
    from hescape.train.features import cached_features, use_feature_cache

    data_path = resolve_dataset(cfg, progress=progress)
    paired = with_fold(load_paired(data_path), cfg)  # data.fold: a donor fold's split
    if prepared_path is None:
        prepared = prepare_expression(cfg, paired, progress=progress)
        prepared_path = prepared_entry_path(cfg, prepared)
    if features_path is None and use_feature_cache(cfg):
        features_path = cached_features(cfg, paired, stain=fit_stain(cfg, paired),
                                        device=resolve_device(cfg.train.use_gpu),
                                        progress=progress)
    return {"data_path": str(data_path), "prepared_path": str(prepared_path),
            "features_path": None if features_path is None else str(features_path)}


@dataclass
class TrainInputs:
    """Everything the loop reads, loaded from the driver's paths."""

    paired: Any
    gene_x: np.ndarray
    feature_names: list[str]
    prep_key: str
    features: np.ndarray | None
    features_path: str | None
    stain: Any
    train_donors: list[str]
    donor_names: np.ndarray
    donors: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray

    @property
    def gene_in_dim(self) -> int:
        return int(self.gene_x.shape[1])

    @property
    def n_donors(self) -> int:
        return len(self.train_donors)


def load_prepared(path: str | Path) -> Any:
    """A PreparedExpression from its cache entry (``.npz``/``.json``/base path)."""
    from hescape.preprocess.cache import load_entry

    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".npz", ".json") else base
    entry = load_entry(base)
    if entry is None:
        raise FileNotFoundError(f"{base}.npz/.json: prepared expression missing or unreadable; "
                                "the driver prepares it (hescape.train.inputs.prepare_inputs)")
    return entry


def load_train_inputs(config: dict[str, Any], cfg: StudyConfig) -> TrainInputs:
    """Worker side: load the dataset, prepared expression and features from their paths."""
    from hescape.data import load_paired
    from hescape.data.splits import with_fold

    return train_inputs(cfg, with_fold(load_paired(config["data_path"]), cfg),
                        load_prepared(config["prepared_path"]), config.get("features_path"))


def train_inputs(cfg: StudyConfig, paired: Any, prepared: Any,
                 features_path: str | Path | None) -> TrainInputs:
    """``TrainInputs`` from what is already loaded (a trial that runs the loop in its own
    process hands its dataset and prepared expression over instead of loading them again)."""
    from hescape.train.features import load_features

    if prepared.X.shape[0] != paired.adata.n_obs:
        raise ValueError(f"prepared expression {prepared.cache_key}: {prepared.X.shape[0]} rows "
                         f"for a dataset of {paired.adata.n_obs} obs (prepared for another "
                         "dataset?)")
    fpath = None if features_path is None else str(features_path)
    features = load_features(fpath, paired.adata.n_obs) if fpath else None
    names = paired.adata.obs["donor"].astype(str).to_numpy()
    train_donors = sorted(map(str, paired.split["train"]))
    return TrainInputs(
        paired=paired, gene_x=prepared.X, feature_names=list(prepared.feature_names),
        prep_key=prepared.cache_key, features=features, features_path=fpath,
        stain=None if features is not None else fit_stain(cfg, paired),
        train_donors=train_donors, donor_names=names, donors=donor_codes(names, train_donors),
        train_idx=paired.indices("train"), val_idx=paired.indices("val"))


def make_train_loader(cfg: StudyConfig, data: TrainInputs, *, encoder: Any, rank: int,
                      world_size: int, device: torch.device) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, sharded (``DistributedSampler``), drop-last loader over training rows.

    ``encoder`` (the model's image encoder) supplies the image preprocessing; unused when
    training reads cached features.
    """
    tc = cfg.train
    dataset = PairedDataset(data.train_idx, gene_x=data.gene_x, donors=data.donors,
                            patches=None if data.features is not None else data.paired.patches,
                            features=data.features)
    sampler = ResumableSampler(dataset, batch_size=tc.batch_size, rank=rank,
                               world_size=world_size, seed=tc.seed)
    if sampler.batches_per_epoch() == 0:
        raise ValueError(f"train.batch_size={tc.batch_size} x {world_size} workers exceeds the "
                         f"{len(dataset)} training spots; lower train.batch_size")
    collate = Collate(None if data.features is not None else encoder, stain=data.stain,
                      augment=cfg.preprocess.image.stain_augment, seed=tc.seed,
                      defer_normalize=device.type == "cuda")  # resize/normalise on the GPU
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate, num_workers=tc.loader_workers,
                        pin_memory=device.type == "cuda",
                        persistent_workers=tc.loader_workers > 0,
                        # own generator: starting an epoch must not draw from the global RNG
                        # (dropout), or a resumed run would diverge from an uninterrupted one
                        generator=torch.Generator().manual_seed(tc.seed))
    return loader, sampler
