"""Batch mixing and biology of each preprocessing method on real STARmap sections.

The measurement behind the mixing table of docs/preprocessing.md (and the bounds of
tests/preprocess/test_preprocess_acceptance.py / test_drvi.py): STARmap mPFC, 3 sections as
batches, 16 cell types (the "NA" cells left out of the biology metrics); every method at its
default settings fitted on all cells (no held-out donors), then ``measure_variant`` (iLISI,
KMeans ARI, silhouette_label of ``hescape.metrics.mixing``). ``--cells 400`` is the seeded
400-cell subsample the CI tests use. All methods of one size run in the same process, so the
seconds compare like with like (one torch thread for scVI/DRVI on CPU).

    python -m benchmarks.preprocess_mixing --methods none,scvi,drvi --cells 400,all

Results merge into ``benchmarks/results/preprocess_mixing.json`` (per size and method); the
table prints to stdout. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STARMAP = REPO / "tests" / "data" / "real" / "starmap_mpfc_3sections.h5ad"
RESULTS = REPO / "benchmarks" / "results" / "preprocess_mixing.json"
SUBSAMPLE_SEED = 0  # the CI subsample: np.random.default_rng(0).choice(n, 400, replace=False)


def starmap_cells(n: int | None) -> Any:
    """The STARmap sections, or the seeded ``n``-cell subsample the tests use."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(STARMAP)
    if n is None or n >= adata.n_obs:
        return adata
    rows = np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(adata.n_obs, n, replace=False))
    return adata[rows].copy()


def measure(adata: Any, method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit ``method`` (defaults + ``options``) on every cell; mixing/bio figures and seconds."""
    from hescape.config import ExpressionPreprocess
    from hescape.preprocess import apply_expression_variant, measure_variant

    data: dict[str, Any] = {"method": method}
    if options:
        data[method] = options
    cfg = ExpressionPreprocess.model_validate(data)
    t0 = time.perf_counter()
    out = apply_expression_variant(adata, cfg, batch_key="batch", progress=False)
    seconds = time.perf_counter() - t0
    m = measure_variant(out, adata, batch_key="batch", label_key="cell_type",
                        ignore_labels=["NA"])
    keep = ("epochs_run", "max_epochs", "early_stopped", "stopped_on_cap", "converged",
            "elbo_validation_tail_change", "drvi_version")
    return {"method": method, "options": options or {}, "cells": int(adata.n_obs),
            "seconds": seconds, "dims": int(out.X.shape[1]),
            "ilisi": m["pre/ilisi"], "ari_kmeans": m["pre/ari_kmeans"],
            "silhouette_label": m["pre/silhouette_label"],
            "info": {k: out.info[k] for k in keep if k in out.info}}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| cells | method | iLISI | ARI (KMeans) | silhouette_label | epochs | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        info = r["info"]
        epochs = ""
        if "epochs_run" in info:
            how = ("early stopped" if info["early_stopped"] else
                   "stopped on its cap" if info["stopped_on_cap"] else "")
            epochs = f"{info['epochs_run']} of {info['max_epochs']} ({how})"
        name = r["method"] + (f" {r['options']}" if r["options"] else "")
        lines.append(f"| {r['cells']:,} | {name} | {r['ilisi']:.3f} | {r['ari_kmeans']:.3f} | "
                     f"{r['silhouette_label']:.3f} | {epochs} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,harmony,combat,scvi,drvi")
    parser.add_argument("--cells", default="400,all", help="comma list of sizes; all = 3,704")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method option, e.g. drvi.max_epochs=50 (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in args.option:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        if not name or not value:
            parser.error(f"--option {item!r}: expected METHOD.KEY=VALUE")
        options.setdefault(method, {})[name] = yaml.safe_load(value)
    from hescape.atomic import write_json

    rows = []
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for size in args.cells.split(","):
        adata = starmap_cells(None if size == "all" else int(size))
        for method in args.methods.split(","):
            row = measure(adata, method, options.get(method))
            row["measured"] = stamp
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for r in rows:
        tag = r["method"] + ("" if not r["options"] else " " + json.dumps(r["options"]))
        done[f"{r['cells']}/{tag}"] = r
    write_json(RESULTS, done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
