"""A trial's evaluation against its training, same run: the issue's 'evaluation proportional
to its work' target (evaluation at most 2x the trial's training time).

At each panel size (``scale-*`` simulator presets: 16 donors, 380 genes, 64 px; smoke: 1k
spots) one head-only trial of experiments/demo.yaml trains on a frozen-feature cache
(``fit``, in process, ``--steps`` steps) and is then evaluated as a study trial evaluates it
(``evaluate_trained``: embed the train + test rows, every per-trial probe on img / gene /
joint and the pair probes, artifacts; no baselines and no embedding UMAPs: a study computes
those once, not per trial). The feature cache holds structured random 1280-d features of the
real shape (the backbone's forward pass is the one-time ``features`` stage of the panel
benchmark, not a trial's cost). Both times come from this process, one after the other.

Row: baseline = training seconds, ours = evaluation seconds, ratio = training / evaluation
(>= 0.5 meets the target); the note adds the same ratio in CPU seconds of this process (all
threads), which a machine shared with other work distorts less than wall time. Not a faithful copy of an old path: where the evaluation's
seconds go, per probe, is ``python -m benchmarks.eval_profile --size 10k``.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Row, command, main_for

SIZES = (10_000, 50_000)
SMOKE_SIZE = 1_000
STEPS = 300  # the panel benchmark's trial
FROZEN_DIM = 1280


def _config(size: int, wd: Path, steps: int) -> Any:
    from benchmarks.panel_stages import study_config

    return study_config(wd, size, steps, sets=["train.in_process=true"])


def _features(cfg: Any, paired: Any, path: Path) -> Path:
    """Structured random backbone features of every spot (its expression's top PCs, a donor
    offset, noise, through a fixed projection; non-negative as pooled CNN features)."""
    from benchmarks.eval_profile import structured_embeddings
    from hescape.preprocess import normalize_log1p

    if not path.is_file():
        emb = structured_embeddings(normalize_log1p(paired.adata),
                                    paired.adata.obs["donor"].astype(str).to_numpy(), dim=8)
        np.save(path, emb["frozen"])
    return path


def measure(size: int, wd: Path, *, steps: int = STEPS) -> dict[str, Any]:
    """Training and evaluation seconds of one frozen-encoder trial at ``size`` spots."""
    from hescape.data import load_paired, simulate
    from hescape.evaluate.checkpoint_eval import evaluate_trained
    from hescape.train import fit
    from hescape.train.trained import TrainedModel

    wd.mkdir(parents=True, exist_ok=True)
    cfg = _config(size, wd, steps)
    t0 = time.perf_counter()
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        simulate(cfg.data.path, cfg.data.simulate, split=cfg.data.split, progress=False,
                 overwrite=True)
    paired = load_paired(cfg.data.path)
    feats = _features(cfg, paired, wd / "features.npy")
    setup_s = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(cfg, run_dir=wd / "trial", features_path=feats, verbose=False)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0

    kwargs: dict[str, Any] = {"features": feats, "baselines": False, "progress": False}
    if "embedding_plots" in inspect.signature(evaluate_trained).parameters:
        kwargs["embedding_plots"] = False
    t0, c0 = time.perf_counter(), time.process_time()
    trained = TrainedModel.load(result.best_checkpoint)
    metrics, _ = evaluate_trained(trained, paired, out_dir=wd / "eval", **kwargs)
    eval_s, eval_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"size": size, "n_train": int(len(paired.indices("train"))),
            "n_test": int(len(paired.indices("test"))), "steps": steps, "setup_s": setup_s,
            "train_s": train_s, "eval_s": eval_s, "train_cpu_s": train_cpu,
            "eval_cpu_s": eval_cpu, "n_metrics": len(metrics),
            "r5_img2gene": metrics.get("test/r5_img2gene")}


def run(smoke: bool, workdir: Path) -> list[Row]:
    rows = []
    for size in ((SMOKE_SIZE,) if smoke else SIZES):
        got = measure(size, workdir / str(size), steps=30 if smoke else STEPS)
        ratio = got["train_s"] / got["eval_s"] if got["eval_s"] else None
        rows.append(Row(
            key="eval_cost", title=f"Trial evaluation vs its training, {size // 1000}k spots",
            unit="s", baseline=f"training ({got['steps']} steps, frozen-feature cache)",
            baseline_value=round(got["train_s"], 2),
            ours="evaluation (embed + per-trial probes)", ours_value=round(got["eval_s"], 2),
            ratio=None if ratio is None else round(ratio, 3),
            target=">= 0.5 (evaluation at most 2x training)", command=command("eval_cost", smoke),
            notes=(f"{got['n_train']} train / {got['n_test']} test spots, "
                   f"eval/train = {got['eval_s'] / got['train_s']:.2f}x wall, "
                   f"{got['eval_cpu_s'] / got['train_cpu_s']:.2f}x CPU; baselines and UMAPs "
                   "are per study; per-probe seconds: python -m benchmarks.eval_profile"),
            details=got,
        ))
    return rows


if __name__ == "__main__":
    main_for(run)
