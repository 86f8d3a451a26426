"""Work shared by all trials, done once per study before any trial starts.

- the dataset: simulated into ``<storage>/cache/data/sim-<hash>`` when ``data.path`` is null;
- every expression-preprocessing variant the sweep can produce (finite choices), through
  the content-addressed cache, with its before-training mixing/biology metrics measured on
  the test donors, like the trials' ``test/`` mixing metrics (``measured_on`` says which
  donors, ``n_batches`` how many batches they hold), and the variant's ``info``
  (convergence, epochs, held-out mapping);
- frozen image-encoder features for every frozen encoder the sweep can produce.
Continuous preprocessing parameters cannot be enumerated; those variants are computed on
first use inside a trial, through the same locked cache, so still only once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hescape import paths
from hescape.config import StudyConfig
from hescape.study.space import enumerate_sections
from hescape.train.faults import maybe_kill_driver


def storage_root(cfg: StudyConfig) -> Path:
    """``cfg.storage_dir``, absolute with ``~`` expanded (``hescape.paths``)."""
    return paths.storage_root(cfg.storage_dir)


def check_dataset_path(cfg: StudyConfig) -> None:
    """A configured dataset must exist (checked before Ray starts)."""
    if cfg.data.path and not paths.absolute(cfg.data.path).exists():
        raise FileNotFoundError(
            f"data.path {paths.absolute(cfg.data.path)}: dataset not found. Import "
            "one with `hescape data import ...` or set data.path: null to use the simulator."
        )


def ensure_dataset(cfg: StudyConfig, *, progress: bool = True) -> Path:
    """The study's dataset; the simulator's output (made once, atomically) when path is null."""
    from hescape.train.inputs import resolve_dataset

    check_dataset_path(cfg)
    return resolve_dataset(cfg, progress=progress)


def study_folds(cfg: StudyConfig) -> list[int | None]:
    """The splits the study's trials use: None = the dataset's own split (the search of a
    tpe/random study, or a grid without donor folds), then each donor fold (with
    ``eval.donor_folds``: the confirm phase, or every grid point)."""
    k = cfg.eval.donor_folds
    folds: list[int | None] = list(range(k)) if k else []
    grid_on_folds = bool(k) and cfg.sweep is not None and cfg.sweep.searcher == "grid"
    return folds if grid_on_folds else [None, *folds]


def fold_config(cfg: StudyConfig, fold: int | None) -> StudyConfig:
    """``cfg`` on donor fold ``fold`` (None: the dataset's split)."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": fold})})


def precompute(cfg: StudyConfig, paired: Any, *, progress: bool = True) -> dict[str, Any]:
    """Compute every enumerable preprocessing variant (on every split the study uses: the
    dataset's and each donor fold's) and frozen feature set once."""
    from hescape.data.splits import with_fold

    base = cfg.model_dump()
    cache = paths.cache_dir(cfg.storage_dir)
    out: dict[str, Any] = {"variants": [], "features": []}
    variants = enumerate_sections(cfg.sweep, base, "preprocess.expression")
    for fold in study_folds(cfg):
        on_fold = with_fold(paired, fold_config(cfg, fold))
        for section in variants or []:
            maybe_kill_driver("precompute", step=len(out["variants"]))  # tests only
            entry = _variant(cfg, base, section, on_fold, cache, progress)
            out["variants"].append({**entry, "fold": fold})
    images = enumerate_sections(cfg.sweep, base, "model.image") or []
    stain_swept = cfg.sweep is not None and any(
        k.startswith("preprocess.image") for k in cfg.sweep.params)
    if stain_swept or cfg.preprocess.image.stain_norm != "none":
        images = []  # stain-normalised features need the fitted normaliser: built in the trial
    for section in images:
        from hescape.train.features import feature_lookup_key, use_feature_cache

        icfg = StudyConfig.model_validate({**base, "model": {**base["model"], "image": section}})
        if not use_feature_cache(icfg):
            continue
        path = _frozen_features(icfg, paired, progress=progress)
        out["features"].append({"encoder": section["name"], "path": str(path),
                                "lookup": feature_lookup_key(icfg)})
    return out


def image_configs(cfg: StudyConfig) -> list[StudyConfig]:
    """One config per image setting (image-encoder section x image preprocessing) the sweep
    can produce, the base config's first; just the base config when a setting is continuous
    (the others are found from the finished trials before the report)."""
    base = cfg.model_dump()
    images = enumerate_sections(cfg.sweep, base, "model.image")
    stains = enumerate_sections(cfg.sweep, base, "preprocess.image")
    if images is None or stains is None:
        return [cfg]
    out = [cfg]
    for image in images:
        for stain in stains:
            out.append(StudyConfig.model_validate(
                {**base, "model": {**base["model"], "image": image},
                 "preprocess": {**base["preprocess"], "image": stain}}))
    return out


def prepared_paths(cfg: StudyConfig, shared_work: dict[str, Any]) -> dict[str, str]:
    """``{variant cache key: entry path}`` of the precomputed preprocessing variants."""
    from hescape.train.inputs import entry_path

    return {v["cache_key"]: str(entry_path(cfg, v["method"], v["cache_key"]))
            for v in shared_work["variants"]}


def feature_paths(shared_work: dict[str, Any]) -> dict[str, str]:
    """``{feature_lookup_key: cache path}`` of the precomputed frozen features."""
    return {f["lookup"]: f["path"] for f in shared_work["features"] if "lookup" in f}


MEASURED_PART = "test"  # the donors the trials' test/ mixing metrics are computed on


def _variant(cfg: StudyConfig, base: dict[str, Any], section: dict[str, Any], paired: Any,
             cache: Path, progress: bool) -> dict[str, Any]:
    """Prepare one variant (cached) and measure it before training on the test donors."""
    import numpy as np

    from hescape.preprocess import measure_variant, prepare

    vcfg = StudyConfig.model_validate({**base, "preprocess": {**base["preprocess"],
                                                              "expression": section}})
    prepared = prepare(paired, vcfg.preprocess.expression, batch_key=cfg.data.batch_key,
                       cache_dir=cache / "preprocess", progress=progress)
    rows = paired.indices(MEASURED_PART)
    metrics = measure_variant(prepared, paired.adata, batch_key=cfg.data.batch_key,
                              label_key=cfg.data.label_key, rows=rows)
    batches = paired.adata.obs[cfg.data.batch_key].astype(str).to_numpy()[rows]
    return {"method": prepared.method, "config": section, "saw_heldout": prepared.saw_heldout,
            "kind": prepared.kind, "cache_key": prepared.cache_key, "metrics": metrics,
            "info": prepared.info, "n_batches": int(len(np.unique(batches))),
            "measured_on": {"part": MEASURED_PART, "donors": list(paired.split[MEASURED_PART]),
                            "n_rows": int(len(rows))}}


def _frozen_features(cfg: StudyConfig, paired: Any, *, progress: bool) -> Path:
    """Encode once: here on CPU studies; as a 1-GPU Ray task when trials train on GPUs
    (the driver usually runs on a CPU head node). The cache directory must be shared."""
    from hescape.train.features import cached_features

    if not cfg.train.use_gpu:
        return cached_features(cfg, paired, progress=progress)
    import ray

    task = ray.remote(num_gpus=1, num_cpus=1)(_features_on_gpu)
    return Path(ray.get(task.remote(cfg.model_dump(), str(paired.path))))


def _features_on_gpu(cfg_dict: dict[str, Any], data_path: str) -> str:
    from hescape.data import load_paired
    from hescape.train.device import resolve_device
    from hescape.train.features import cached_features

    cfg = StudyConfig.model_validate(cfg_dict)
    return str(cached_features(cfg, load_paired(data_path), device=resolve_device(True),
                               progress=False))
