"""One stage of the panel-scaling benchmark, run alone in this process (see panel_scaling.py).

``python -m benchmarks.panel_stages STAGE --workdir W --size N [--steps S]`` runs STAGE on
the panel of N spots kept under W and writes ``W/stages/STAGE.json``: the seconds of the work
itself (imports excluded), this process's RSS before the work, and what the stage produced.
Stages read what earlier ones wrote (dataset, preprocessing and feature caches, checkpoint).

The study configuration is ``experiments/demo.yaml`` (frozen ImageNet EfficientNet-Lite0 at
64 px, MLP gene tower, demo eval settings) on the simulated panel, without its sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "experiments" / "demo.yaml"
PREPROCESS = ("none", "pca", "harmony", "scvi", "combat", "drvi")
SCVI_FIXED_EPOCHS = 10
STAGES = ("simulate", "validate", *(f"pre_{m}" for m in PREPROCESS), "pre_scvi_10ep",
          "features", "trial", "trial_eval", "evaluate")
METHOD = {**{f"pre_{m}": m for m in PREPROCESS}, "pre_scvi_10ep": "scvi"}


def rss_mib() -> float:
    """Current resident set of this process (MiB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def study_config(workdir: Path, size: int, steps: int, sets: list[str] | None = None) -> Any:
    """demo.yaml on the simulated panel of ``size`` spots (no sweep), storage under workdir;
    ``sets``: extra ``key=value`` overrides (e.g. a quick run's scVI epochs)."""
    from hescape.config import load_config
    from hescape.data.presets import scale_fields

    fixed = {"name": "panel_scaling", "storage_dir": str(workdir / "runs"), "sweep": "null",
             "data.path": str(workdir / "data"), "train.max_steps": steps,
             "train.eval_every": max(1, steps // 3),
             **{f"data.simulate.{k}": v for k, v in scale_fields(size).items()}}
    return load_config(DEMO_YAML, [f"{k}={v}" for k, v in fixed.items()] + list(sets or []))


def preprocess_variant(cfg: Any, method: str) -> Any:
    """The study's expression section with ``method`` chosen (its options as configured);
    a method with a held-out protocol choice runs inductively."""
    data = cfg.preprocess.expression.model_dump()
    data["method"] = method
    if isinstance(data.get(method), dict) and "mode" in data[method]:
        data[method]["mode"] = "inductive"
    return type(cfg.preprocess.expression).model_validate(data)


def _simulate(cfg: Any, wd: Path) -> dict[str, Any]:
    from hescape.data import simulate

    path = simulate(wd / "data", cfg.data.simulate, split=cfg.data.split, progress=False,
                    overwrite=True)
    manifest = json.loads((path / "manifest.json").read_text())
    return {"n_obs": manifest["n_obs"], "n_vars": manifest["n_vars"],
            "split": {k: len(v) for k, v in manifest["split"].items()},
            "patch_store_mib": (path / "patches.npy").stat().st_size / 2**20,
            "expression_mib": (path / "expression.h5ad").stat().st_size / 2**20}


def _validate(cfg: Any, wd: Path) -> dict[str, Any]:
    from hescape.data import load_paired

    paired = load_paired(cfg.data.path)
    return {"n_obs": int(paired.adata.n_obs), "nnz": int(paired.adata.X.nnz),
            "parts": {p: int(len(paired.indices(p))) for p in ("train", "val", "test")}}


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _preprocess(method: str, **options: Any) -> Callable[[Any, Path], dict[str, Any]]:
    """The stage computing ``method`` (its ``options`` overridden, e.g. fixed scVI epochs)."""
    def run(cfg: Any, wd: Path) -> dict[str, Any]:
        from hescape.data import load_paired
        from hescape.preprocess import prepare
        from hescape.train.inputs import cache_root

        paired = load_paired(cfg.data.path)
        variant = preprocess_variant(cfg, method)
        if options:
            section = {**getattr(variant, method).model_dump(), **options}
            variant = variant.model_copy(update={method: type(getattr(variant, method))(
                **section)})
        prepared = prepare(paired, variant, batch_key=cfg.data.batch_key,
                           cache_dir=cache_root(cfg) / "preprocess", progress=False)
        return {"variant": variant.model_dump(mode="json"),
                "shape": list(prepared.X.shape), "dtype": str(prepared.X.dtype),
                "saw_heldout": bool(prepared.saw_heldout), "info": _jsonable(prepared.info)}

    return run


def _features(cfg: Any, wd: Path) -> dict[str, Any]:
    import numpy as np

    from hescape.data import load_paired
    from hescape.train.features import cached_features

    path = cached_features(cfg, load_paired(cfg.data.path), progress=False)
    feats = np.load(path, mmap_mode="r")
    return {"shape": list(feats.shape), "dtype": str(feats.dtype),
            "encoder": cfg.model.image.name, "image_size": cfg.model.image.image_size}


def _trial(cfg: Any, wd: Path) -> dict[str, Any]:
    from hescape.train import fit

    result = fit(cfg, run_dir=wd / "trial", verbose=False)
    keep = ("step", "train/loss", "val/r5_img2gene", "val/mean_rank_img2gene",
            "sys/peak_rss_mib")
    return {"best_checkpoint": str(result.best_checkpoint), "steps": cfg.train.max_steps,
            "batch_size": cfg.train.batch_size,
            "last": {k: result.metrics.get(k) for k in keep}}


def _evaluate(cfg: Any, wd: Path) -> dict[str, Any]:
    from hescape.evaluate import evaluate_checkpoint

    trial = json.loads((wd / "stages" / "trial.json").read_text())
    metrics, _ = evaluate_checkpoint(trial["info"]["best_checkpoint"], cfg.data.path,
                                     out_dir=wd / "eval", progress=False)
    keep = [k for k in sorted(metrics) if k.endswith(("r5_img2gene", "r5_gene2img"))
            or "pearson_mean" in k or k.endswith("n_test")]
    return {"metrics": {k: metrics[k] for k in keep}, "n_metrics": len(metrics)}


def _trial_eval(cfg: Any, wd: Path) -> dict[str, Any]:
    """The trial's evaluation as a study trial runs it (``evaluation.evaluate_trial``'s
    call): the trained model on the cached features and the prepared variant, every
    per-trial probe; no baselines (a study evaluates them once) and no embedding UMAPs (drawn
    at report time for the top trials)."""
    from hescape.data import load_paired
    from hescape.evaluate.checkpoint_eval import evaluate_trained
    from hescape.train.features import cached_features
    from hescape.train.trained import TrainedModel

    trial = json.loads((wd / "stages" / "trial.json").read_text())
    paired = load_paired(cfg.data.path)
    trained = TrainedModel.load(trial["info"]["best_checkpoint"])
    feats = cached_features(trained.cfg, paired, progress=False)
    metrics, _ = evaluate_trained(trained, paired, out_dir=wd / "trial_eval", features=feats,
                                  baselines=False, embedding_plots=False, progress=False)
    keep = [k for k in sorted(metrics) if k.endswith(("r5_img2gene", "r5_gene2img"))
            or "pearson_mean" in k or k.endswith("n_test")]
    return {"metrics": {k: metrics[k] for k in keep}, "n_metrics": len(metrics)}


# modules each stage imports, loaded before its clock starts (import time is not work)
IMPORTS: dict[str, tuple[str, ...]] = {
    "simulate": ("hescape.data", "anndata", "scipy.ndimage"),
    "validate": ("hescape.data", "anndata"),
    **{f"pre_{m}": ("hescape.data", "hescape.preprocess", "sklearn.decomposition")
       for m in PREPROCESS},
    "pre_harmony": ("hescape.data", "hescape.preprocess", "harmonypy"),
    "pre_scvi": ("hescape.data", "hescape.preprocess", "scvi"),
    "pre_scvi_10ep": ("hescape.data", "hescape.preprocess", "scvi"),
    "pre_drvi": ("hescape.data", "hescape.preprocess", "scvi", "drvi"),
    "features": ("hescape.data", "hescape.models", "hescape.train.features", "timm"),
    "trial": ("hescape.train", "hescape.train.runner", "hescape.train.loop", "hescape.models",
              "hescape.metrics.retrieval", "sklearn.neighbors"),
    "evaluate": ("hescape.evaluate.checkpoint_eval", "hescape.evaluate.pipeline", "umap",
                 "matplotlib.pyplot", "sklearn.linear_model"),
    "trial_eval": ("hescape.evaluate.checkpoint_eval", "hescape.evaluate.pipeline",
                   "hescape.train.trained", "sklearn.linear_model"),
}


def warm_imports(stage: str) -> None:
    """Import the stage's modules now (missing optional ones are the stage's problem)."""
    import importlib

    for name in IMPORTS.get(stage, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


RUNNERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "simulate": _simulate, "validate": _validate,
    **{f"pre_{m}": _preprocess(m) for m in PREPROCESS},
    # per-epoch cost: exactly SCVI_FIXED_EPOCHS for the reference and for the query model
    "pre_scvi_10ep": _preprocess("scvi", max_epochs=SCVI_FIXED_EPOCHS, early_stopping=False),
    "features": _features, "trial": _trial, "trial_eval": _trial_eval, "evaluate": _evaluate,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="config override key=value (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch  # every stage starts from the same base (a study's processes import it)

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS") or (os.cpu_count() or 1)))
    wd = args.workdir.resolve()
    cfg = study_config(wd, args.size, args.steps, args.sets)
    warm_imports(args.stage)
    before = rss_mib()
    t0 = time.perf_counter()
    info = RUNNERS[args.stage](cfg, wd)
    work = time.perf_counter() - t0
    (wd / "stages").mkdir(parents=True, exist_ok=True)
    out = {"stage": args.stage, "size": args.size, "work_s": work, "rss_before_mib": before,
           "info": info}
    (wd / "stages" / f"{args.stage}.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
