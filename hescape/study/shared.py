"""Work shared by all trials, done once per study before any trial starts.

- the dataset: simulated into ``<storage>/data/sim-<hash>`` when ``data.path`` is null;
- every expression-preprocessing variant the sweep can produce (finite choices), through
  the content-addressed cache, with its before-training mixing/biology metrics;
- frozen image-encoder features for every frozen encoder the sweep can produce.
Continuous preprocessing parameters cannot be enumerated; those variants are computed on
first use inside a trial, through the same locked cache, so still only once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig
from hescape.study.space import enumerate_sections


def storage_root(cfg: StudyConfig) -> Path:
    return Path(cfg.storage_dir).expanduser().resolve()


def dataset_path(cfg: StudyConfig) -> Path:
    """The dataset a study uses; for simulated data, where the simulation is stored."""
    if cfg.data.path:
        path = Path(cfg.data.path).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(
                f"data.path {path}: dataset not found. Import one with `hescape data import ...` "
                "or set data.path: null to use the simulator."
            )
        return path
    blob = json.dumps(
        {"simulate": cfg.data.simulate.model_dump(), "split": cfg.data.split.model_dump()},
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return storage_root(cfg) / "data" / f"sim-{digest}"


def ensure_dataset(cfg: StudyConfig, *, progress: bool = True) -> Path:
    """Simulate the embedded default dataset if needed (atomic; safe to call repeatedly)."""
    from filelock import FileLock

    from hescape.data import simulate

    path = dataset_path(cfg)
    if cfg.data.path or (path / "manifest.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "manifest.json").exists():
            simulate(path, cfg.data.simulate, split=cfg.data.split, progress=progress)
    return path


def precompute(cfg: StudyConfig, paired: Any, *, progress: bool = True) -> dict[str, Any]:
    """Compute every enumerable preprocessing variant and frozen feature set once."""
    from hescape.preprocess import measure_variant, prepare

    base = cfg.model_dump()
    cache = storage_root(cfg) / "cache"
    out: dict[str, Any] = {"variants": [], "features": []}
    variants = enumerate_sections(cfg.sweep, base, "preprocess.expression")
    for section in variants or []:
        vcfg = StudyConfig.model_validate({**base, "preprocess": {**base["preprocess"],
                                                                  "expression": section}})
        prepared = prepare(paired, vcfg.preprocess.expression, batch_key=cfg.data.batch_key,
                           cache_dir=cache / "preprocess", progress=progress)
        metrics = measure_variant(prepared, paired.adata, batch_key=cfg.data.batch_key,
                                  label_key=cfg.data.label_key)
        out["variants"].append(
            {"method": prepared.method, "config": section, "saw_heldout": prepared.saw_heldout,
             "cache_key": prepared.cache_key, "metrics": metrics}
        )
    images = enumerate_sections(cfg.sweep, base, "model.image") or []
    for section in images:
        if section.get("mode") != "frozen" or not cfg.train.feature_cache:
            continue
        from hescape.train.features import cached_features

        icfg = StudyConfig.model_validate({**base, "model": {**base["model"], "image": section}})
        path = cached_features(icfg, paired, progress=progress)
        out["features"].append({"encoder": section["name"], "path": str(path)})
    return out
