"""Packed head-only trials: how many trials per GPU pay off (``train.gpus_per_trial``).

For each K in ``--k`` (default 1,2,4,8), ``--trials`` head-only trials (frozen
EfficientNet-Lite0 features from the study's cache, demo.yaml otherwise, seeds 0..n-1) run
through Ray Tune with ``train.gpus_per_trial = 1/K``, so K share the GPU at once. Per K:
wall seconds, trials/hour, speed-up over K = 1, the largest per-trial GPU peak
(``sys/peak_gpu_mib``: K times it must fit in the GPU's memory) and per-trial peak RSS.

    python -m benchmarks.packed_trials --size 50k --steps 2000        # on a GPU machine
    python -m benchmarks.packed_trials --smoke                         # CPU: fake 1-GPU Ray

``--smoke`` starts local Ray with a fake GPU (Ray schedules GPU shares without one) and the
loop falls back to the CPU: it checks the plumbing, not the speed. Without a GPU no H200
figure exists: the docs say so until this has run there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.panel_scaling import RESULTS, parse_sizes
from benchmarks.panel_stages import study_config


def _trial(config: dict[str, Any]) -> None:
    """One head-only trial: ``fit`` from the driver's cached inputs; final metrics reported."""
    from ray import tune

    from hescape.config import StudyConfig
    from hescape.train import fit

    cfg = StudyConfig.model_validate(config["cfg"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": config["seed"]})})
    run_dir = Path(config["dir"]) / f"k{config['k']}-seed{config['seed']}"
    t0 = time.perf_counter()
    result = fit(cfg, run_dir=run_dir, prepared_path=config["prepared_path"],
                 features_path=config["features_path"], verbose=False)
    peaks = [h.get("sys/peak_gpu_mib", 0.0) for h in result.history]
    tune.report({"fit_s": time.perf_counter() - t0, "peak_gpu_mib": max(peaks, default=0.0),
                 "peak_rss_mib": result.metrics.get("sys/peak_rss_mib", 0.0),
                 "val_r5": result.metrics.get("val/r5_img2gene", float("nan"))})


def run_k(k: int, cfg: Any, paths: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``args.trials`` trials with a 1/k GPU share each; wall time and per-trial peaks."""
    import ray
    from ray import cloudpickle, tune

    from hescape.study.resources import max_concurrent_trials, trial_resources

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers import nothing of ours
    train = cfg.train.model_copy(update={"use_gpu": True, "gpus_per_trial": 1.0 / k,
                                         "cpus_per_worker": max(1.0, (os.cpu_count() or 2) // k)})
    kcfg = cfg.model_copy(update={"train": train})
    res = trial_resources(kcfg)
    concurrency = max_concurrent_trials(res, ray.cluster_resources(), k, "packed_trials")
    space = {"cfg": kcfg.model_dump(mode="json"), "k": k, "dir": str(args.workdir / "trials"),
             "seed": tune.grid_search(list(range(args.trials))), **paths}
    tuner = tune.Tuner(tune.with_resources(_trial, res.trial), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
                       run_config=tune.RunConfig(storage_path=str(args.workdir / "tune"),
                                                 name=f"k{k}", verbose=0))
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    rows = [r.metrics for r in results if r.error is None]
    return {"k": k, "gpus_per_trial": 1.0 / k, "concurrency": concurrency, "wall_s": wall,
            "trials_ok": len(rows), "trials_per_h": 3600.0 * len(rows) / wall,
            "peak_gpu_mib_max": max((r["peak_gpu_mib"] for r in rows), default=None),
            "peak_rss_mib_max": max((r["peak_rss_mib"] for r in rows), default=None),
            "fit_s_median": sorted(r["fit_s"] for r in rows)[len(rows) // 2] if rows else None,
            "errors": [str(r.error)[:300] for r in results if r.error is not None]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="1,2,4,8", help="trials per GPU to compare (1,2,4,8)")
    p.add_argument("--trials", type=int, default=8, help="trials per K (8)")
    p.add_argument("--size", type=parse_sizes, default=[50_000], help="panel spots (50k)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--smoke", action="store_true", help="CPU, fake GPU, tiny panel")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hescape-packed-trials"))
    p.add_argument("--out", type=Path, default=RESULTS / "packed_trials.json")
    args = p.parse_args(argv)
    ks = sorted({int(x) for x in args.k.split(",") if x.strip()})
    size, steps = (320, 10) if args.smoke else (args.size[0], args.steps)
    if args.smoke:
        ks, args.trials = [k for k in ks if k <= 2] or [1, 2], 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from hescape.train.inputs import prepare_inputs

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.smoke:
        p.error("no GPU here: run with --smoke to check the plumbing on a fake GPU")
    cfg = study_config(args.workdir.resolve(), size, steps)
    if not (args.workdir / "data" / "manifest.json").is_file():
        from hescape.data import simulate

        simulate(cfg.data.path, cfg.data.simulate, split=cfg.data.split, progress=False)
    paths = prepare_inputs(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"use_gpu": has_gpu})}), progress=False)
    ray.init(num_gpus=None if has_gpu else 1, include_dashboard=False, log_to_driver=False)
    try:
        rows = [run_k(k, cfg, {k2: v for k2, v in paths.items() if k2 != "data_path"}, args)
                for k in ks]
    finally:
        ray.shutdown()
    base = rows[0]["trials_per_h"] or None
    for row in rows:
        row["speedup_vs_k1"] = row["trials_per_h"] / base if base else None
    out = {"gpu": torch.cuda.get_device_name(0) if has_gpu else "none (fake GPU, CPU loop)",
           "size": size, "steps": steps, "trials_per_k": args.trials, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("| K per GPU | trials/h | speed-up | peak GPU MiB / trial | peak RSS MiB / trial |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['trials_per_h']:.0f} | {r['speedup_vs_k1'] or 0:.2f} | "
              f"{r['peak_gpu_mib_max'] or 0:.0f} | {r['peak_rss_mib_max'] or 0:.0f} |")
    return 0 if all(r["trials_ok"] == args.trials for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
