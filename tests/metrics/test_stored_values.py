"""Every evaluation probe this project computes itself, against values stored before the
speed work on it (tests/data/metric_reference/values.json).

One seeded input (``reference_data``: 6 donors, 4 labels, structured embeddings, exact
duplicate rows for ties, small blocks so the blocked paths run several blocks) goes through
the registered probes of ``hescape.evaluate.suite`` that do not belong to the HEST or the
mutation probe (those have their own tests): whole-set / within-donor / in-batch / fixed-
gallery retrieval, BLEEP, per-donor ridge, the logistic and kNN label probes and the mixing
figures, on every feature set (img, gene, joint, a 64-d frozen-encoder stand-in, PCA of
expression). A faster path must give the same numbers: counts and recalls exactly, every
other figure to 1e-6 relative (one neighbour or one prediction more or less moves a figure
by >= 1e-3 here).

The values were recorded with ``python tests/metrics/test_stored_values.py --record`` on the
code before the change they guard; re-record only for an intended change of protocol, and
say so in the commit.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

STORED = Path(__file__).parents[1] / "data" / "metric_reference" / "values.json"
PROBES = ("retrieval", "retrieval_gallery", "bleep", "ridge_per_donor", "label", "knn_label",
          "mixing")  # fmt: skip
REL = 1e-6


def reference_data():
    """The seeded EvalData every stored value is computed on."""
    from hescape.config import EvalConfig
    from hescape.evaluate.probe_spec import EvalData

    rng = np.random.default_rng(2024)
    n_donors, per, d, genes = 6, 90, 24, 40
    donors = np.repeat([f"D{i}" for i in range(n_donors)], per)
    n = len(donors)
    labels = rng.integers(0, 4, size=n)
    centres = rng.normal(size=(4, d)) * 1.5
    shift = rng.normal(size=(n_donors, d)) * 0.8
    signal = centres[labels] + shift[np.repeat(np.arange(n_donors), per)]
    img = signal + rng.normal(size=(n, d))
    gene = signal + 0.6 * rng.normal(size=(n, d))
    img[5], gene[5] = img[4], gene[4]  # exact duplicates: ties in ranks and neighbours
    img[300], gene[300] = img[301], gene[301]
    frozen = np.maximum(signal @ rng.normal(size=(d, 64)) / 5 + rng.normal(size=(n, 64)), 0)
    mu = np.exp(0.3 * signal @ rng.normal(size=(d, genes)) / np.sqrt(d) + 1.0)
    counts = rng.poisson(mu).astype(np.float32)
    expr = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame({"donor": donors, "slide": donors,
                        "state": np.array(["alpha", "beta", "gamma", "delta"])[labels]})
    obs.loc[obs.index[::37], "state"] = None  # some unlabelled spots
    cfg = EvalConfig(block_size=64, inbatch_size=32, inbatch_repeats=3, probe_top_genes=12,
                     probe_pca=16, bleep_k=5, mixing_subsample=200, fixed_gallery=100,
                     fixed_gallery_draws=3, seed=3, probe_protocol="per_donor")  # fmt: skip
    train = np.flatnonzero(np.isin(donors, ["D0", "D1", "D2"]))
    test = np.flatnonzero(np.isin(donors, ["D3", "D4", "D5"]))
    return EvalData(obs=obs, img=img.astype(np.float32), gene=gene.astype(np.float32),
                    train_idx=train, test_idx=test, cfg=cfg, expr_log=expr, counts=counts,
                    gene_names=[f"G{i}" for i in range(genes)], label_key="state",
                    batch_key="donor", baselines={"frozen": frozen.astype(np.float32)})


def _feature_sets(data) -> dict[str, tuple[np.ndarray, bool]]:
    """The pipeline's feature sets, built here so this test does not move with the pipeline:
    ``{name: (X, computed from expression)}``."""
    from hescape.evaluate.baselines import pca_expression
    from hescape.metrics.retrieval import l2_normalize

    img, gene = l2_normalize(data.img), l2_normalize(data.gene)
    return {"img": (img, False), "gene": (gene, True),
            "joint": (l2_normalize(np.hstack([img, gene])), True),
            "baseline_frozen": (data.baselines["frozen"], False),
            "baseline_pca": (pca_expression(data.expr_log, data.train_idx, seed=3), True)}


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def compute() -> dict[str, dict]:
    """``{probe[/features]: {"metrics": ..., "per_donor": [[metric, donor, value, n]...]}}``."""
    from dataclasses import replace

    from hescape.evaluate.probe_spec import PROBES as REGISTRY
    from hescape.evaluate.probe_spec import probe_specs
    from hescape.metrics.retrieval import l2_normalize

    probe_specs()  # registers the suite
    data = reference_data()
    data = replace(data, img=l2_normalize(data.img), gene=l2_normalize(data.gene))
    out: dict[str, dict] = {}
    for name in PROBES:
        spec = REGISTRY.get(name)
        runs = ([(name, lambda s=spec: s.run(data))] if spec.scope == "pair" else
                [(f"{name}/{fs}", lambda s=spec, x=x: s.run(x, data))
                 for fs, (x, from_expr) in _feature_sets(data).items()
                 if spec.applies(data, from_expression=from_expr)])  # fmt: skip
        for key, run in runs:
            result = run()
            per = [] if result.per_donor is None else [
                [r.metric, r.donor, _plain(r.value), int(r.n)]
                for r in result.per_donor.itertuples()]  # fmt: skip
            out[key] = {"metrics": {k: _plain(v) for k, v in sorted(result.metrics.items())},
                        "per_donor": per}
    out["mixing_capped"] = {"metrics": _capped_mixing(), "per_donor": []}
    out["kbet_per_label"] = {"metrics": _kbet_labels(data), "per_donor": []}
    return out


def _capped_mixing() -> dict[str, float | None]:
    """Fewer rows than the 90-neighbour list (padded lists, ``knn_capped``), one label with a
    single batch, float64 input."""
    from hescape.metrics.mixing import mixing_metrics

    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 5)) + np.repeat(np.eye(5)[:3] * 2, 20, axis=0)
    batch = np.tile(["a", "b", "c"], 20)
    labels = np.repeat(["l0", "l1", "l2"], 20)
    batch[40:] = "a"
    m = mixing_metrics(x, batch, labels, subsample=None, seed=1)
    return {k: _plain(v) for k, v in sorted(m.items())}


def _kbet_labels(data) -> dict[str, float | None]:
    from hescape.metrics.kbet import kbet_per_label, knn_with_self

    te = data.test_idx
    y = data.obs["state"].to_numpy()[te]
    keep = pd.notna(y)
    x = np.asarray(data.img[te][keep], dtype=np.float64)
    _, codes = np.unique(data.obs["donor"].to_numpy()[te][keep], return_inverse=True)
    idx, dist = knn_with_self(x, 50)
    _, per = kbet_per_label(idx, dist, codes, y[keep].astype(str))
    return {k: _plain(v) for k, v in sorted(per.items())}


@pytest.fixture(scope="module")
def stored_and_now():
    return json.loads(STORED.read_text()), compute()


def _same(now, stored) -> bool:
    if stored is None or now is None:
        return stored is None and now is None
    if isinstance(stored, (int, float)) and isinstance(now, (int, float)):
        return now == pytest.approx(stored, rel=REL, abs=1e-12)
    return now == stored


def test_the_same_runs(stored_and_now):
    stored, now = stored_and_now
    assert sorted(now) == sorted(stored)


@pytest.mark.parametrize("key", sorted(json.loads(STORED.read_text())) if STORED.is_file() else [])
def test_values_equal_stored(stored_and_now, key):
    stored, now = stored_and_now
    got, want = now[key], stored[key]
    assert sorted(got["metrics"]) == sorted(want["metrics"]), key
    bad = {k: (got["metrics"][k], v) for k, v in want["metrics"].items()
           if not _same(got["metrics"][k], v)}  # fmt: skip
    assert not bad, f"{key}: (now, stored) {bad}"
    assert len(got["per_donor"]) == len(want["per_donor"])
    for g, w in zip(got["per_donor"], want["per_donor"], strict=True):
        assert g[:2] == w[:2] and g[3] == w[3] and _same(g[2], w[2]), (key, g, w)


if __name__ == "__main__":
    if "--record" not in sys.argv:
        sys.exit("usage: python tests/metrics/test_stored_values.py --record  (overwrites "
                 f"{STORED}; only for an intended change of protocol)")
    STORED.parent.mkdir(parents=True, exist_ok=True)
    STORED.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {STORED}")
