"""Memory: peak RSS of one trial process (cached features vs re-encoding the frozen tower).

Each trial (``hescape.train.fit``, in-process, the frozen-encoder config of
``frozen_cache``) runs in a fresh subprocess; its peak RSS is ``ru_maxrss`` at exit. For a
Tune trial, log the same figure to MLflow from inside the trial with
``benchmarks.common.peak_rss_mb()`` (see docs/benchmarks.md, "Peak memory of a trial").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, Row, command, main_for, peak_rss_mb, smaps_rollup

KEY = "trial_memory"


def child(workdir: str, smoke: str, cache: str) -> None:
    """Subprocess: one trial, then print its peak RSS (MiB)."""
    from benchmarks.common import setup_env
    from benchmarks.frozen_cache import sizes, trial_config
    from hescape.train import fit

    setup_env()
    s = sizes(smoke == "1")
    cfg = trial_config(Path(workdir), s, cache=cache == "1", seed=0)
    fit(cfg, run_dir=Path(workdir) / f"mem-{cache}", verbose=False)
    import os

    print(json.dumps({"peak_rss_mb": peak_rss_mb(), **smaps_rollup(os.getpid())}))


def measure(workdir: Path, smoke: bool, cache: bool) -> dict[str, float]:
    """Peak RSS and end-of-trial RSS/PSS/private memory (MiB) of one trial, fresh process."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.trial_memory", "--child",
                          str(workdir), str(int(smoke)), str(int(cache))],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(smoke: bool, workdir: Path) -> list[Row]:
    """Peak RSS of a cached-feature trial and of a re-encoding trial."""
    from benchmarks.frozen_cache import sizes, trial_config
    from hescape.train.inputs import prepare_inputs

    s = sizes(smoke)
    prepare_inputs(trial_config(workdir, s, cache=True, seed=0), progress=False)  # untimed
    cached = measure(workdir, smoke, cache=True)
    reencode = None if smoke else measure(workdir, smoke, cache=False)  # smoke: one side
    base = None if reencode is None else reencode["peak_rss_mb"]
    return [Row(
        key=KEY, title="Peak RSS of one trial process", unit="MiB",
        baseline="re-encode every step", baseline_value=base, ours="feature cache",
        ours_value=cached["peak_rss_mb"], ratio=base / cached["peak_rss_mb"] if base else None,
        target="reported (MLflow: see docs)", command=command(KEY, smoke),
        notes=(f"frozen efficientnet_lite0 at {s['image']} px, batch {s['batch']}, "
               f"{s['steps']} steps; RSS counts ~1 GiB of shared library pages (import torch "
               f"+ timm + sklearn alone peak ~950 MiB); private memory at the end: "
               f"{cached['private_mb']:.0f} MiB cached"
               + ("" if reencode is None else f", {reencode['private_mb']:.0f} MiB re-encode")
               + (" (smoke: re-encode side not run)" if reencode is None else "")),
        details={"cached": cached, "reencode": reencode, **s},
    )]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main_for(run)
