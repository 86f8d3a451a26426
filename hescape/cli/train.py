"""``hescape train <config.yaml> [--set k=v ...] [--workers N]``: train one model.

Checkpoints go to ``<storage_dir>/train/<name>/`` (re-running the same name resumes;
``--restart`` starts over). Prints progress every evaluation and the best validation
retrieval at the end.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HEADLINE = ("r1_img2gene", "r5_img2gene", "r10_img2gene", "r5_gene2img", "mean_rank_img2gene",
            "inbatch64_r5_img2gene", "loss")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train one model from a study YAML (no sweep)",
        description="Train the two-tower model of a study YAML on its dataset (the simulator "
        "when data.path is null): in this process for 1 CPU worker, else as a Ray Train "
        "TorchTrainer. Any sweep section is ignored.")
    p.add_argument("config", type=Path, help="study YAML (e.g. experiments/train_small.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers (train.num_workers); >1 runs a TorchTrainer")
    p.add_argument("--gpu", action="store_true", help="train on GPU(s) (train.use_gpu)")
    p.add_argument("--restart", action="store_true",
                   help="delete this name's previous checkpoints instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hescape.config import load_config
    from hescape.paths import train_dir
    from hescape.train import fit, runs_in_process

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    if args.gpu:
        overrides.append("train.use_gpu=true")
    cfg = load_config(args.config, overrides)
    run_dir = train_dir(cfg.storage_dir, cfg.name)
    if args.restart and run_dir.exists():
        shutil.rmtree(run_dir)
    mode = "in-process" if runs_in_process(cfg) else (
        f"Ray TorchTrainer, {cfg.train.num_workers} worker(s)"
        + (", GPU" if cfg.train.use_gpu else ""))
    print(f"training {cfg.name!r} ({mode}); checkpoints in {run_dir}", flush=True)
    result = fit(cfg, run_dir=run_dir, verbose=not args.quiet)
    print_summary(result, cfg.train.best_metric)
    return 0


def print_summary(result, best_metric: str) -> None:
    """Best checkpoint and its validation retrieval next to chance."""
    best = result.best_metrics or result.metrics
    if not best:
        print("no evaluation was reported (max_steps already reached by a previous run? "
              "use --restart)")
        return
    n = best.get("val/retrieval_n", float("nan"))
    print(f"best checkpoint: {result.best_checkpoint} (step {best.get('step')}, "
          f"{best_metric} {best.get(best_metric, float('nan')):.4f})")
    print(f"validation ({int(n) if n == n else '?'} spots of held-out donors):")
    for name in HEADLINE:
        key = f"val/{name}"
        if key in best:
            chance = _chance(name, n)
            extra = f"   (chance {chance:.4f})" if chance is not None else ""
            print(f"  {name:<24} {best[key]:.4f}{extra}")
    if "val/donor_acc_gene" in best:
        print(f"  donor probe acc gene/img  {best['val/donor_acc_gene']:.3f} / "
              f"{best.get('val/donor_acc_img', float('nan')):.3f}   (chance "
              f"{best.get('val/donor_chance', float('nan')):.3f})")


def _chance(name: str, n: float) -> float | None:
    if name.startswith("mean_rank"):
        return (n + 1) / 2
    if name.startswith("r") and "_" in name and not name.startswith("inbatch"):
        k = int(name[1:name.index("_")])
        return min(1.0, k / n)
    if name.startswith("inbatch"):
        size, k = name[len("inbatch"):].split("_")[:2]
        return min(1.0, int(k[1:]) / int(size))
    return None
