"""MO-ASHA vs ASHA (first objective), ASHA (weighted sum) and no early stopping: hypervolume
of the final validation front vs wall-clock, side by side in one run (issue 21.4).

Two stages, both in this run:

1. record -- a pool of configurations drawn at random from a batch-correction space
   (expression method none/harmony/combat, donor adversary on/off and its weight, learning
   rate, temperature) is trained to the end with hescape's own training loop on a simulated
   study with donor effects (``data.simulate.donor_effect``), every evaluation step recording
   the objectives (validation retrieval ``val/r5_img2gene`` and validation mixing of the gene
   embedding ``val/gene/ilisi``; also the validation expression probe and loss) and the CPU
   seconds of the segment (training steps + validation, one thread: the shared machine's
   load does not enter). The preprocessing variants are prepared before, as a study's shared
   precompute does.
2. replay -- per seed, a random order of the pool is the search's stream of configurations
   (the same stream for every arm). Each arm runs it on ``--workers`` simulated workers:
   a trial's reports arrive after its recorded segment times, and the arm's real scheduler
   decides at each (hescape's ``MOASHA``; Ray's ``ASHAScheduler`` on the first objective, or
   on the equal-weight sum of the raw objectives; none). Same rungs as a study: grace period
   one evaluation, reduction factor 2. The no-stopping arm runs ``--trials`` configurations;
   its end is the budget T, and every other arm keeps drawing from the stream until T.
   A trial counts for the front once it ran to its last step (as the study report's Pareto
   front reads finished trials). Hypervolume of the front of the finished trials' final
   validation objectives, reference point (0, 0) (both objectives are >= 0), vs simulated
   wall-clock.

Reported per arm (median and range over seeds): hypervolume at T, the time to reach the
no-stopping arm's final hypervolume (as a fraction of T; "never" when not reached by T), and
trials started. Limits: the wall-clock is simulated from recorded segment times (scheduling
overhead and Ray's start-up are not in it); each configuration was trained once (one
training seed), so the seeds vary the search's draws and order, not training noise.

    python -m benchmarks.moasha            # ~20-30 min on 2 cores (recording dominates)
    python -m benchmarks.moasha --smoke    # seconds-to-a-minute, for the test
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
OBJECTIVES = [("val/r5_img2gene", "max"), ("val/gene/ilisi", "max")]
RECORDED = ["val/r5_img2gene", "val/gene/ilisi", "val/img/ridge_donor_cv_pearson", "val/loss"]
ARMS = ("none", "asha_first", "asha_wsum", "moasha")
ARM_TITLES = {"none": "no early stopping", "asha_first": "ASHA on val/r5_img2gene",
              "asha_wsum": "ASHA on val/r5_img2gene + val/gene/ilisi",
              "moasha": "MO-ASHA (both objectives)"}


# ------------------------------------------------------------------------- study setup
def study_updates(smoke: bool) -> dict[str, Any]:
    """The simulated study: 10 donors (5 train / 3 validation / 2 test), strong donor effect."""
    spots, steps, every = (60, 30, 10) if smoke else (100, 120, 15)
    return {
        "data.simulate.n_donors": 10, "data.simulate.spots_per_donor": spots,
        "data.simulate.patch_size": 16, "data.simulate.n_genes": 60,
        "data.simulate.donor_effect": 1.5, "data.split.val_fraction": 0.3,
        "data.split.test_fraction": 0.2,
        "model.image.name": "tiny_cnn", "model.image.pretrained": False,
        "model.image.mode": "finetune", "model.gene.name": "mlp", "model.gene.hidden_dim": 64,
        "model.gene.n_layers": 1, "model.embed_dim": 32,
        "train.batch_size": 64, "train.max_steps": steps, "train.eval_every": every,
        "train.warmup_steps": 5,
        "eval.inbatch_repeats": 1, "eval.plots": False, "eval.baselines": False,
        "eval.probe_pca": 16,
        "sweep": {"searcher": "random", "scheduler": "moasha",
                  "objectives": [{"metric": m, "mode": "max" if m != "val/loss" else "min"}
                                 for m in RECORDED]},
    }


def draw_configs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` random points of the batch-correction space."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        adv = bool(rng.random() < 0.5)
        out.append({
            "preprocess.expression.method": str(rng.choice(["none", "harmony", "combat"])),
            "model.adversary.enabled": adv,
            **({"model.adversary.weight": float(rng.uniform(0.2, 2.0))} if adv else {}),
            "train.lr": float(np.exp(rng.uniform(np.log(3e-4), np.log(3e-2)))),
            "loss.init_temperature": float(np.exp(rng.uniform(np.log(0.03), np.log(0.2)))),
            "train.seed": i,
        })
    return out


def record_pool(n: int, smoke: bool, workdir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Train every configuration to the end; per evaluation its objectives and CPU seconds."""
    import torch
    from tqdm.auto import tqdm

    from benchmarks.studycfg import bench_config
    from hescape.train import fit
    from hescape.train.inputs import prepare_inputs

    torch.set_num_threads(1)
    configs = draw_configs(n, seed)
    base = study_updates(smoke)
    for method in sorted({c["preprocess.expression.method"] for c in configs}):
        prepare_inputs(bench_config(workdir, {**base, "preprocess.expression.method": method}),
                       progress=False)  # the study's shared precompute: not trial time
    pool = []
    for i, params in enumerate(tqdm(configs, desc="recording the pool")):
        cfg = bench_config(workdir, {**base, **params})
        seen: list[dict[str, float]] = []
        last = [time.thread_time()]

        def report(metrics: dict[str, Any], _ckpt: Any, seen=seen, last=last) -> None:
            now = time.thread_time()
            seen.append({"step": int(metrics["step"]), "seconds": now - last[0],
                         **{m: float(metrics[m]) for m in RECORDED}})
            last[0] = time.thread_time()

        fit(cfg, run_dir=workdir / "pool" / f"c{i:03d}", verbose=False, report_callback=report)
        pool.append({"params": params, **{k: [s[k] for s in seen]
                                          for k in ("step", "seconds", *RECORDED)}})
    return pool


# ------------------------------------------------------------------------------- replay
def _stub(trial_id: str):
    from ray.tune.experiment import Trial

    return Trial("replay", config={}, trial_id=trial_id, stub=True)


def make_scheduler(arm: str, every: int, max_steps: int):
    """The arm's scheduler, with a study's rungs (grace 1 evaluation, reduction factor 2)."""
    from ray.tune.schedulers import ASHAScheduler

    from hescape.study.moasha import MOASHA

    rungs = {"time_attr": "step", "max_t": max_steps + 1, "grace_period": every,
             "reduction_factor": 2}
    if arm == "none":
        return None
    if arm == "moasha":
        return MOASHA(metrics=[m for m, _ in OBJECTIVES], modes=[d for _, d in OBJECTIVES],
                      **rungs)
    metric = OBJECTIVES[0][0] if arm == "asha_first" else "wsum"
    return ASHAScheduler(metric=metric, mode="max", **rungs)


def replay(pool: list[dict[str, Any]], order: list[int], arm: str, *, workers: int,
           budget: float | None, n_trials: int | None) -> dict[str, Any]:
    """Run ``arm`` over the stream ``order``: until ``n_trials`` started (no-stopping arm)
    or until the ``budget`` (others). Returns finished trials with completion times."""
    every, max_steps = pool[0]["step"][0], pool[0]["step"][-1]
    sched = make_scheduler(arm, every, max_steps)
    stream = iter(order)
    events: list[tuple[float, int, int, int]] = []  # (time, serial, pool index, eval index)
    free = [0.0] * workers
    finished, started, serial = [], 0, 0
    trials: dict[int, Any] = {}

    def start(at: float) -> bool:
        nonlocal started, serial
        if (n_trials is not None and started >= n_trials) or (budget is not None and at >= budget):
            return False
        idx = next(stream, None)
        if idx is None:
            return False
        started += 1
        serial += 1
        trials[serial] = _stub(f"s{serial}")
        if sched is not None:
            sched.on_trial_add(None, trials[serial])
        heapq.heappush(events, (at + pool[idx]["seconds"][0], serial, idx, 0))
        return True

    for w in range(workers):
        start(free[w])
    while events:
        now, sid, idx, k = heapq.heappop(events)
        if budget is not None and now > budget:
            break  # the budget is spent: what runs now never finishes
        curve = pool[idx]
        result = {"step": curve["step"][k], **{m: curve[m][k] for m, _ in OBJECTIVES}}
        result["wsum"] = sum(result[m] for m, _ in OBJECTIVES)
        last = k == len(curve["step"]) - 1
        action = "CONTINUE"
        if sched is not None:
            action = sched.on_trial_result(None, trials[sid], result)
        if last or action == "STOP":
            if last:
                if sched is not None:
                    sched.on_trial_complete(None, trials[sid], result)
                finished.append({"time": now, "pool": idx,
                                 "values": [result[m] for m, _ in OBJECTIVES]})
            start(now)
        else:
            heapq.heappush(events, (now + curve["seconds"][k + 1], sid, idx, k + 1))
    end = max([f["time"] for f in finished], default=0.0)
    return {"finished": finished, "started": started, "end": end}


def hypervolume_2d(points: list[list[float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by ``points`` (both objectives maximised) above ``ref``."""
    pts = sorted({(float(a), float(b)) for a, b in points if a > ref[0] and b > ref[1]},
                 key=lambda p: (-p[0], -p[1]))
    area, best_b = 0.0, ref[1]
    for a, b in pts:  # descending in the first objective: each adds a strip above best_b
        if b > best_b:
            area += (a - ref[0]) * (b - best_b)
            best_b = b
    return area


def hv_curve(finished: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(time, hypervolume of the trials finished by then), at every completion."""
    out, done = [], []
    for f in sorted(finished, key=lambda f: f["time"]):
        done.append(f["values"])
        out.append((f["time"], hypervolume_2d(done)))
    return out


def compare(pool: list[dict[str, Any]], *, seeds: int, trials: int, workers: int) -> list[dict]:
    """Every arm on every seed's stream; the no-stopping arm sets each seed's budget."""
    rows = []
    for seed in range(seeds):
        order = list(np.random.default_rng(1000 + seed).permutation(len(pool)))
        ref = replay(pool, order, "none", workers=workers, budget=None, n_trials=trials)
        budget = ref["end"]
        target = hypervolume_2d([f["values"] for f in ref["finished"]])
        for arm in ARMS:
            run = ref if arm == "none" else replay(pool, order, arm, workers=workers,
                                                   budget=budget, n_trials=None)
            curve = hv_curve(run["finished"])
            hv = curve[-1][1] if curve else 0.0
            reach = next((t for t, v in curve if v >= target - 1e-12), None)
            rows.append({"seed": seed, "arm": arm, "budget_s": budget, "hv": hv,
                         "target_hv": target, "time_to_target_s": reach,
                         "time_to_target_frac": None if reach is None else reach / budget,
                         "started": run["started"], "finished": len(run["finished"]),
                         "curve": curve})
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        hv = np.array([r["hv"] for r in mine])
        ratio = np.array([r["hv"] / r["target_hv"] if r["target_hv"] else np.nan for r in mine])
        frac = [r["time_to_target_frac"] for r in mine]
        reached = [f for f in frac if f is not None]
        out[arm] = {
            "hv_median": float(np.median(hv)), "hv_min": float(hv.min()), "hv_max": float(hv.max()),
            "hv_vs_none_median": float(np.nanmedian(ratio)),
            "hv_vs_none_min": float(np.nanmin(ratio)), "hv_vs_none_max": float(np.nanmax(ratio)),
            "reached": len(reached), "seeds": len(mine),
            "time_to_target_frac_median": float(np.median([f if f is not None else np.inf
                                                           for f in frac])),
            "started_median": float(np.median([r["started"] for r in mine])),
            "finished_median": float(np.median([r["finished"] for r in mine])),
        }
    return out


def markdown(summary: dict, meta: dict, pool_info: dict) -> str:
    lines = [
        f"# MO-ASHA vs ASHA vs no early stopping ({meta['when']})", "",
        f"Pool: {meta['pool']} configurations trained to {meta['max_steps']} steps "
        f"(evaluation every {meta['every']}), {pool_info['cpu_s']:.0f} CPU s to record; "
        f"{meta['seeds']} seeds (stream orders), {meta['trials']} trials for no stopping, "
        f"{meta['workers']} simulated workers; budget T = the no-stopping arm's wall-clock "
        f"(median {meta['budget_median_s']:.0f} s). Objectives: "
        + ", ".join(f"`{m}` ({d})" for m, d in OBJECTIVES) + "; hypervolume reference (0, 0).",
        "",
        "| arm | hypervolume at T (median, range) | vs no stopping (median, range) | "
        "reached no-stopping HV (seeds) | time to it / T (median) | trials started | "
        "finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        s = summary[arm]
        frac = s["time_to_target_frac_median"]
        lines.append(
            f"| {ARM_TITLES[arm]} | {s['hv_median']:.4f} ({s['hv_min']:.4f}-{s['hv_max']:.4f}) "
            f"| {s['hv_vs_none_median']:.2f}x ({s['hv_vs_none_min']:.2f}-"
            f"{s['hv_vs_none_max']:.2f}) | {s['reached']}/{s['seeds']} | "
            f"{'never' if not np.isfinite(frac) else f'{frac:.2f}'} | "
            f"{s['started_median']:.0f} | {s['finished_median']:.0f} |")
    m, a = summary["moasha"], summary["asha_first"]
    lines += ["", f"MO-ASHA / ASHA (first objective) hypervolume at equal budget: "
              f"{m['hv_median'] / a['hv_median']:.2f}x (medians)." if a["hv_median"] else "",
              "", f"Command: `{meta['command']}` ({meta['seconds']:.0f} s).", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (about a minute)")
    ap.add_argument("--pool", type=int, default=40, help="configurations trained")
    ap.add_argument("--trials", type=int, default=12, help="trials of the no-stopping arm")
    ap.add_argument("--seeds", type=int, default=10, help="stream orders (>= 3)")
    ap.add_argument("--workers", type=int, default=2, help="simulated concurrent trials")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--fixture", type=Path, default=None,
                    help="also write the recorded curves here (tests/data/moasha_curves.json)")
    ap.add_argument("--pool-file", type=Path, default=None,
                    help="replay a pool recorded earlier (the JSON this writes) instead")
    args = ap.parse_args(argv)
    if args.smoke:
        args.pool, args.trials, args.seeds = 6, 3, 3
    if args.seeds < 3 or args.trials > args.pool:
        ap.error("--seeds must be >= 3 and --trials <= --pool")
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import setup_env
    from hescape.atomic import write_json, write_text

    args = parse_args(argv)
    setup_env(1)
    t0 = time.perf_counter()
    import tempfile

    if args.pool_file is not None:
        pool = json.loads(args.pool_file.read_text())["pool"]
    else:
        with tempfile.TemporaryDirectory(prefix="moasha-bench-") as tmp:
            pool = record_pool(args.pool, args.smoke, Path(tmp))
    rows = compare(pool, seeds=args.seeds, trials=args.trials, workers=args.workers)
    summary = summarise(rows)
    budgets = [r["budget_s"] for r in rows if r["arm"] == "none"]
    meta = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "pool": len(pool), "trials": args.trials, "seeds": args.seeds,
            "workers": args.workers, "max_steps": pool[0]["step"][-1],
            "every": pool[0]["step"][0], "budget_median_s": float(np.median(budgets)),
            "smoke": args.smoke, "seconds": time.perf_counter() - t0,
            "command": " ".join(["python -m benchmarks.moasha",
                                 *(sys.argv[1:] if argv is None else argv)])}
    pool_info = {"cpu_s": float(sum(sum(c["seconds"]) for c in pool))}
    table = markdown(summary, meta, pool_info)
    stem = "moasha_smoke" if args.smoke else "moasha"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", {"meta": meta, "summary": summary, "rows": rows,
                                            "pool": pool}, indent=None)
    write_text(args.out / f"{stem}.md", table)
    if args.fixture is not None:
        write_json(args.fixture, {"source": meta["command"], "curves": [
            {k: c[k] for k in ("step", *RECORDED)} for c in pool]})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
