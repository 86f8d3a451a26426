"""Where a trial's evaluation time goes: seconds per (probe, feature set) at panel sizes.

    python -m benchmarks.eval_profile --size 10k             # one size (minutes at 50k)
    python -m benchmarks.eval_profile --size 10k,50k --json out.json
    python -m benchmarks.eval_profile --smoke                # 2k spots, seconds
    python -m benchmarks.eval_profile --size 50k --only mixing,label --cprofile 25

Inputs are what ``hescape.evaluate.checkpoint_eval.evaluate_trained`` gives
``evaluate_embeddings`` in the panel-scaling benchmark (``benchmarks/panel_stages.py``): the
``scale-{size}`` simulator preset (16 donors, 380 genes) with demo.yaml's split and eval
settings, the train + test rows, raw counts and their log-normalised expression, the donor /
state / mutation / slide columns. The expression half is simulated for real (cached under
``--workdir``); the patches are not rendered and no model is trained: a probe's cost depends
on the shapes and the structure of its inputs, not on trained weights. The embeddings are
therefore *structured random* matrices of the real shapes: each spot's simulated expression
(its top PCs), a donor offset and noise, through fixed random projections -- ``img`` / ``gene``
``--embed-dim`` (128) each, ``baseline_frozen`` 1280-d and non-negative (EfficientNet-Lite0's
pooled features), ``baseline_pca`` the pipeline's own PCA of expression (30-d). The metric
values are meaningless; the seconds are what an evaluation of a model of that size costs.

The embedding step (the trained heads over the cached 1280-d features and the gene input)
is timed with a freshly built model of demo.yaml's architecture on the same rows.

Rows: ``embed`` (heads forward), ``feature_sets`` (L2 normalisation, joint, PCA baseline),
each applicable (probe, feature set) in the pipeline's order, and the artifacts that scale
with N (``embeddings.h5ad``, the UMAP layouts). Used by ``benchmarks/eval_cost.py`` (the
benchmark row: evaluation vs training seconds in the same run).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {"2k": 2_000, "10k": 10_000, "50k": 50_000, "200k": 200_000}
FROZEN_DIM = 1280  # EfficientNet-Lite0's pooled features
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "hescape-eval-profile"


@dataclass
class Timing:
    """Seconds of one step of the evaluation."""

    step: str
    features: str
    seconds: float
    note: str = ""
    cpu: float | None = None  # CPU seconds of this process (all threads) during the step


def parse_size(text: str) -> int:
    key = text.strip().lower()
    if key in SIZES:
        return SIZES[key]
    return int(float(key.rstrip("k")) * (1000 if key.endswith("k") else 1))


def study_config(size: int, workdir: Path) -> Any:
    """demo.yaml on the ``scale-*`` panel of ``size`` spots, as the panel benchmark runs it."""
    from benchmarks.panel_stages import study_config as panel_config

    return panel_config(workdir, size, steps=300)


def _expression(cfg: Any, cache: Path):
    """The simulated panel's AnnData (counts, obs) and split, cached as .h5ad + .json."""
    import anndata as ad

    from hescape.data.contract import resolve_split
    from hescape.data.simulate import simulate_expression

    h5, js = cache / "expression.h5ad", cache / "split.json"
    if h5.is_file() and js.is_file():
        return ad.read_h5ad(h5), json.loads(js.read_text())
    adata, _ = simulate_expression(cfg.data.simulate)
    split = resolve_split(adata, cfg.data.split, source="simulate")
    adata.obs = adata.obs.drop(columns=["state_idx"])
    cache.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(h5)
    js.write_text(json.dumps(split))
    return adata, split


def _project(x: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    return (x @ rng.standard_normal((x.shape[1], dim)) / np.sqrt(x.shape[1])).astype(np.float32)


def structured_embeddings(expr_log: np.ndarray, donors: np.ndarray, *, dim: int,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """``img``, ``gene`` (``dim``) and ``frozen`` (1280-d, non-negative) of the rows: each
    spot's top expression PCs + a donor offset + noise, through fixed random projections."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(len(expr_log), min(len(expr_log), 5000), replace=False)
    pcs = PCA(16, random_state=seed).fit(expr_log[fit_rows]).transform(expr_log)
    pcs = (pcs / pcs.std(0)).astype(np.float32)
    _, d_codes = np.unique(donors, return_inverse=True)
    offsets = rng.standard_normal((d_codes.max() + 1, 16)).astype(np.float32) * 0.7
    signal = pcs + offsets[d_codes]

    def noisy(scale: float) -> np.ndarray:
        return signal + scale * rng.standard_normal(signal.shape).astype(np.float32)

    img = _project(noisy(1.5), dim, rng) + 0.3 * rng.standard_normal((len(pcs), dim))
    gene = _project(noisy(0.7), dim, rng) + 0.3 * rng.standard_normal((len(pcs), dim))
    frozen = np.maximum(_project(noisy(2.0), FROZEN_DIM, rng)
                        + 0.5 * rng.standard_normal((len(pcs), FROZEN_DIM)), 0)
    return {"img": img.astype(np.float32), "gene": gene.astype(np.float32),
            "frozen": frozen.astype(np.float32)}


def build_inputs(size: int, *, workdir: Path = DEFAULT_WORKDIR, embed_dim: int = 128,
                 seed: int = 0, baselines: bool = True):
    """(EvalData of the panel's train + test rows, study config); ``baselines=False``: a
    trial's evaluation in a study (the baselines are evaluated once per study)."""
    from hescape.evaluate.probe_spec import EvalData
    from hescape.preprocess import normalize_log1p

    cfg = study_config(size, workdir)
    adata, split = _expression(cfg, workdir / f"expr-{size}")
    donors = adata.obs["donor"].astype(str).to_numpy()
    train = np.flatnonzero(np.isin(donors, split["train"]))
    test = np.flatnonzero(np.isin(donors, split["test"]))
    rows = np.union1d(train, test)
    expr_log = normalize_log1p(adata)
    emb = structured_embeddings(expr_log[rows], donors[rows], dim=embed_dim, seed=seed)
    ecfg = cfg.eval if baselines else cfg.eval.model_copy(update={"baselines": False})
    data = EvalData(
        obs=adata.obs.iloc[rows], img=emb["img"], gene=emb["gene"], cfg=ecfg,
        train_idx=np.searchsorted(rows, train), test_idx=np.searchsorted(rows, test),
        expr_log=expr_log[rows], counts=adata.X[rows], gene_names=list(map(str, adata.var_names)),
        label_key=cfg.data.label_key, mutation_key=cfg.data.mutation_key,
        batch_key=cfg.data.batch_key, baselines={"frozen": emb["frozen"]},
    )
    return data, cfg


def time_embedding(cfg: Any, data: Any, *, threads: int | None = None) -> float:
    """Seconds of the heads' forward over the evaluated rows (cached-feature trial on CPU)."""
    import torch

    from hescape.models.two_tower import build_model
    from hescape.train.embed import compute_embeddings

    if threads:
        torch.set_num_threads(threads)
    model = build_model(cfg.model, cfg.loss, gene_in_dim=data.expr_log.shape[1],
                        n_donors=int(data.obs["donor"].nunique()))
    feats = data.baselines["frozen"]
    t0 = time.perf_counter()
    compute_embeddings(model, gene_x=data.expr_log, features=feats, batch_size=256)
    return time.perf_counter() - t0


def profile_probes(data: Any, *, only: set[str] | None = None, cprofile: int = 0,
                   out=sys.stderr, metrics: dict[str, dict] | None = None) -> list[Timing]:
    """Seconds of each applicable (probe, feature set), in the pipeline's order.

    ``only``: probe names to run (all when None); ``cprofile``: print the top functions
    (cumulative) of each timed job; ``metrics``: filled with each job's figures
    (``{probe/features: {name: value}}``, to compare two versions of the code)."""
    from hescape.evaluate.pipeline import feature_sets
    from hescape.evaluate.probe_spec import probe_specs
    from hescape.metrics.retrieval import l2_normalize

    t0, c0 = time.perf_counter(), time.process_time()
    data = replace(data, img=l2_normalize(data.img), gene=l2_normalize(data.gene))
    sets = feature_sets(data)
    timings = [Timing("feature_sets", "", time.perf_counter() - t0,
                      "L2 normalisation, joint, PCA baseline", time.process_time() - c0)]
    for spec in probe_specs():
        if only and spec.name not in only:
            continue
        if spec.scope == "pair":
            jobs = [None] if spec.applies(data) else []
        else:
            jobs = [fs for fs in sets if spec.applies(data, from_expression=fs.from_expression)]
        for fs in jobs:
            name = "pair" if fs is None else fs.name
            prof = cProfile.Profile() if cprofile else None
            note = ""
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if prof:
                        prof.enable()
                    result = spec.run(data) if fs is None else spec.run(fs.X, data)
                    if result is None:
                        note = "not run (probe protocol)"
                    elif metrics is not None:
                        metrics[f"{spec.name}/{name}"] = {k: float(v)
                                                          for k, v in result.metrics.items()}
            except ValueError as exc:
                note = f"skipped: {exc}"
            finally:
                if prof:
                    prof.disable()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            timings.append(Timing(spec.name, name, seconds, note, cpu))
            print(f"  {spec.name:18s} {name:16s} {seconds:8.2f} s  cpu {cpu:8.2f} s "
                  f"{note[:60]}", file=out, flush=True)
            if prof:
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(cprofile)
                print(buf.getvalue(), file=out)
    return timings


def time_artifacts(data: Any, workdir: Path) -> list[Timing]:
    """The artifacts that grow with N: embeddings.h5ad and the UMAP layouts (plots on)."""
    from hescape.evaluate.pipeline import joint_embedding, plot_embeddings, write_embeddings
    from hescape.metrics.retrieval import l2_normalize

    te = data.test_idx
    img, gene = l2_normalize(data.img), l2_normalize(data.gene)
    embs = {"img": img[te], "gene": gene[te], "joint": joint_embedding(img, gene)[te]}
    out = workdir / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    write_embeddings(out / "embeddings.h5ad", data.obs.iloc[te], **embs)
    h5 = Timing("embeddings.h5ad", "img,gene,joint", time.perf_counter() - t0,
                cpu=time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    plot_embeddings(out, embs, data.obs.iloc[te], cfg=data.cfg,
                    keys=["donor", data.batch_key, data.label_key])
    umap = Timing("umap_plots", "img,gene,joint", time.perf_counter() - t0,
                  f"{min(len(te), data.cfg.mixing_subsample)} rows each, numba compile "
                  "included", time.process_time() - c0)
    return [h5, umap]


def profile(size: int, *, workdir: Path = DEFAULT_WORKDIR, embed_dim: int = 128,
            only: set[str] | None = None, artifacts: bool = True, embed: bool = True,
            baselines: bool = True, cprofile: int = 0, out=sys.stderr) -> dict[str, Any]:
    """Every timing of one size, with the shapes it ran on."""
    t0 = time.perf_counter()
    data, cfg = build_inputs(size, workdir=workdir, embed_dim=embed_dim, baselines=baselines)
    setup = time.perf_counter() - t0
    print(f"[eval_profile] {size} spots: {len(data.train_idx)} train, {len(data.test_idx)} "
          f"test rows (inputs {setup:.1f} s)", file=out, flush=True)
    timings: list[Timing] = []
    if embed:
        c0 = time.perf_counter(), time.process_time()
        time_embedding(cfg, data)
        timings.append(Timing("embed", "img,gene", time.perf_counter() - c0[0],
                              f"heads over {len(data.obs)} rows, CPU",
                              time.process_time() - c0[1]))
        print(f"  embed {timings[-1].seconds:.2f} s", file=out, flush=True)
    figures: dict[str, dict] = {}
    timings += profile_probes(data, only=only, cprofile=cprofile, out=out, metrics=figures)
    if artifacts and not only:
        timings += time_artifacts(data, workdir / f"out-{size}")
    return {"size": size, "n_train": int(len(data.train_idx)),
            "n_test": int(len(data.test_idx)), "embed_dim": embed_dim,
            "eval": cfg.eval.model_dump(mode="json"),
            "timings": [t.__dict__ for t in timings],
            "total_s": float(sum(t.seconds for t in timings)), "metrics": figures}


def table(results: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """Markdown: one row per (step, feature set); per result (a size, or a labelled run) its
    wall seconds and CPU seconds (all threads of the process)."""
    labels = labels or [f"{r['size'] // 1000}k" for r in results]
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, int], tuple[float, float | None]] = {}
    for i, res in enumerate(results):
        for t in res["timings"]:
            key = (t["step"], t["features"])
            if key not in keys:
                keys.append(key)
            cells[(*key, i)] = (t["seconds"], t.get("cpu"))
    head = "| step | features | " + " | ".join(f"{lab}: s | {lab}: cpu s" for lab in labels)
    lines = [head + " |", "|---|---|" + "---:|---:|" * len(results)]

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    for key in keys:
        vals = [cells.get((*key, i), (None, None)) for i in range(len(results))]
        lines.append(f"| {key[0]} | {key[1]} | "
                     + " | ".join(f"{fmt(w)} | {fmt(c)}" for w, c in vals) + " |")
    totals = [(sum(t["seconds"] for t in r["timings"]),
               sum(t.get("cpu") or 0.0 for t in r["timings"])) for r in results]
    lines.append("| **total** | | " + " | ".join(f"**{w:.1f}** | **{c:.1f}**" for w, c in totals)
                 + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="10k", help="comma list of 2k, 10k, 50k, 200k, N")
    parser.add_argument("--smoke", action="store_true", help="2k spots, no artifacts")
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--only", default="", help="comma list of probe names")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="print the top N functions of each job")
    parser.add_argument("--no-artifacts", action="store_true")
    parser.add_argument("--no-embed", action="store_true")
    parser.add_argument("--no-baselines", action="store_true",
                        help="a study trial's evaluation: no baseline feature sets")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="cache of the simulated expression (reused)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the timings here")
    args = parser.parse_args(argv)
    from benchmarks.common import setup_env

    setup_env(args.threads)
    sizes = [2_000] if args.smoke else [parse_size(s) for s in args.size.split(",") if s]
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    results = [profile(n, workdir=args.workdir, embed_dim=args.embed_dim, only=only,
                       artifacts=not (args.no_artifacts or args.smoke),
                       embed=not args.no_embed, baselines=not args.no_baselines,
                       cprofile=args.cprofile) for n in sizes]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
