"""A 30-trial demo-size study end to end: this checkout against an earlier commit, same run.

    python -m benchmarks.demo_study                      # before = BEFORE_REF (see below)
    python -m benchmarks.demo_study --before <git ref> --trials 30
    python -m benchmarks.demo_study --smoke              # 4 trials, seconds of training

Both sides run ``study/run.py experiments/demo.yaml`` with ``sweep.num_samples`` trials
(TPE + ASHA over the demo's space), each in its own fresh storage directory and its own
local Ray, one after the other in this process's run; ``--interleave`` alternates them
when run more than once (``--repeats``). The earlier commit is checked out as a git worktree
(``git worktree add``; removed afterwards) and run with ``PYTHONPATH`` pointing at it, so its
driver and its Ray workers import its own ``hescape`` (sys.path comes before the editable
install's finder). Both sides get the same settings; this checkout's confirm phase is turned
off (``sweep.confirm.enabled=false``), so both run the same trials and write the same kind of
report. ``--stack K`` adds a third side: this checkout with ``train.stack_size=K`` (head-only
trials trained vectorised, same trials and report). Reported: wall seconds of each whole study (process start to exit, Ray start and the
shared precompute included), trials finished, and the ratio. Results:
``benchmarks/results/demo_study.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import Row  # noqa: E402

BEFORE_REF = "0e0c481"  # main before the per-trial cost work of issue 20 (2026-12-03)
RESULTS = REPO / "benchmarks" / "results"


def _worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref],
                   check=True, capture_output=True, text=True)
    return where


def _remove_worktree(where: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                   capture_output=True, text=True)
    shutil.rmtree(where, ignore_errors=True)


def run_study(checkout: Path, storage: Path, trials: int, *, extra: list[str]) -> dict:
    """One whole study from ``checkout``; wall seconds and what it finished."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(checkout)}
    args = [sys.executable, str(checkout / "study" / "run.py"),
            str(checkout / "experiments" / "demo.yaml"), f"--set=storage_dir={storage}",
            f"--set=sweep.num_samples={trials}", "--set=name=bench", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=6 * 3600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{checkout}: study failed ({out.returncode}):\n{out.stderr[-3000:]}")
    finished = out.stdout.count(" finished at step ")
    stopped = out.stdout.count("stopped by ASHA") + out.stdout.count("stopped early")
    report = storage / "bench" / "report" / "report.md"
    sections = [ln for ln in report.read_text().splitlines() if ln.startswith("## ")]
    return {"wall_s": wall, "finished": finished, "stopped": stopped, "sections": sections}


def run(smoke: bool, workdir: Path, *, before: str = BEFORE_REF, trials: int | None = None,
        repeats: int = 1, stack: int = 0) -> list[Row]:
    trials = trials or (4 if smoke else 30)
    extra = ["--set=train.max_steps=20", "--set=train.eval_every=10"] if smoke else []
    old = _worktree(before, workdir / "before")
    try:
        sides: dict[str, list[dict]] = {"before": [], "ours": [], **(
            {"stacked": []} if stack > 1 else {})}
        for i in range(repeats):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for side in order:
                checkout = old if side == "before" else REPO
                more = extra + (["--set=sweep.confirm.enabled=false"] if side != "before" else [])
                if side == "stacked":
                    more += [f"--set=train.stack_size={stack}", "--set=train.stack_wait_s=10"]
                sides[side].append(run_study(checkout, workdir / f"{side}-{i}", trials,
                                             extra=more))
    finally:
        _remove_worktree(old)
    b = min(r["wall_s"] for r in sides["before"])
    rows = []
    for side, label in (("ours", "this checkout"),
                        ("stacked", f"this checkout, train.stack_size={stack}")):
        if side not in sides:
            continue
        o = min(r["wall_s"] for r in sides[side])
        rows.append(Row(
            key="demo_study", title=f"{trials}-trial demo-size study, end to end"
            + (f", stacked K={stack}" if side == "stacked" else ""), unit="s/study",
            baseline=f"main at {before}", baseline_value=b, ours=label,
            ours_value=o, ratio=b / o if o else None, target=">= 3x",
            command=f"python -m benchmarks.demo_study --trials {trials}"
            + (f" --stack {stack}" if side == "stacked" else ""),
            notes=(f"finished/stopped trials: before {sides['before'][0]['finished']}/"
                   f"{sides['before'][0]['stopped']}, ours {sides[side][0]['finished']}/"
                   f"{sides[side][0]['stopped']}; best of {repeats}"),
            details={"before": sides["before"], side: sides[side]}))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--before", default=BEFORE_REF, help="git ref of the earlier code")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides n times")
    parser.add_argument("--stack", type=int, default=0,
                        help="also run this checkout with train.stack_size=K")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="demo-study-") as tmp:
        rows = run(args.smoke, Path(tmp), before=args.before, trials=args.trials,
                   repeats=args.repeats, stack=args.stack)
    out = [r.to_dict() for r in rows]
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "demo_study.json").write_text(json.dumps(out, indent=1, default=str))
        (RESULTS / "demo_study.md").write_text("".join(
            f"| {r.title} | before {r.baseline_value:.0f} s | {r.ours} {r.ours_value:.0f} s | "
            f"**{r.ratio:.2f}x** | {r.notes} |\n" for r in rows))
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
