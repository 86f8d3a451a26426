"""The evaluation pipeline: embeddings in, ``test/...`` metrics and artifacts out.

Order: whole-set retrieval on the held-out rows -> expression probes (HEST ridge on the
image embedding, BLEEP retrieval img -> training gene embedding) -> label / mutation probes
and batch-mixing for the image, gene and joint embeddings -> baselines (frozen image
features, PCA of expression) -> artifacts (embeddings.h5ad, tables, PNGs).

The joint embedding is the L2-normalised concatenation of the (normalised) image and gene
embeddings, so its cosine is the mean of the two towers' cosines. The mutation probe uses
train + test rows with its own donor-grouped CV (mutation labels are per donor, and a
held-out split usually holds too few donors alone); every other probe fits on ``train_idx``
and scores ``test_idx``. With ``gene=None`` / ``expr_log=None`` (image-only data) the
retrieval, expression and gene-side parts are skipped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from hescape.config import EvalConfig
from hescape.evaluate import plots
from hescape.evaluate.baselines import as_baselines, comparison_table, run_baselines
from hescape.evaluate.probes import retrieval_expression_probe
from hescape.evaluate.retrieval import cross_modal_retrieval, l2_normalize, retrieval_ranks
from hescape.evaluate.suite import EvalData, probe_suite


def joint_embedding(img: np.ndarray, gene: np.ndarray | None) -> np.ndarray:
    """L2-normalised concatenation of the normalised image and gene embeddings."""
    img = l2_normalize(img)
    return img if gene is None else l2_normalize(np.hstack([img, l2_normalize(gene)]))


def _as_index(rows: np.ndarray | Sequence, n: int, name: str) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"{name}: boolean mask of length {arr.shape} for {n} rows")
        return np.flatnonzero(arr)
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name}: indices outside 0..{n - 1}")
    return arr


def _check(img, gene, obs, expr_log, gene_names, batch_key) -> None:
    n = len(img)
    if len(obs) != n:
        raise ValueError(f"obs has {len(obs)} rows but img has {n} (rows must be in obs order)")
    if gene is not None and np.shape(gene) != np.shape(img):
        raise ValueError(f"gene embedding shape {np.shape(gene)} != img shape {np.shape(img)}")
    for col in {"donor", batch_key}:
        if col not in obs.columns:
            raise ValueError(f"obs lacks column {col!r}; columns: {list(obs.columns)}")
    if expr_log is not None:
        if len(expr_log) != n or gene_names is None or len(gene_names) != np.shape(expr_log)[1]:
            raise ValueError(
                f"expr_log {np.shape(expr_log)} must be N x G with N = {n} and G = len(gene_names)"
            )


Step = Callable[[], tuple[dict[str, float], dict[str, pd.DataFrame], dict[str, np.ndarray]]]


def _retrieval(img, gene, data: EvalData):
    te, cfg = data.test_idx, data.cfg
    ranks = retrieval_ranks(img[te], gene[te], cfg.block_size)
    m = cross_modal_retrieval(
        img[te],
        gene[te],
        donors=data.obs["donor"].to_numpy()[te],
        ks=cfg.ks,
        block_size=cfg.block_size,
        inbatch_size=cfg.inbatch_size,
        inbatch_repeats=cfg.inbatch_repeats,
        seed=cfg.seed,
        precomputed_ranks=ranks,
    )
    return m, {}, ranks


def _bleep(img, gene, data: EvalData):
    tr, te, cfg = data.train_idx, data.test_idx, data.cfg
    m, table = retrieval_expression_probe(
        gene[tr],
        data.expr_log[tr],
        img[te],
        data.expr_log[te],
        test_donors=data.obs["donor"].to_numpy()[te],
        gene_names=data.gene_names,
        k=cfg.bleep_k,
        n_top=cfg.probe_top_genes,
        block_size=cfg.block_size,
    )
    return m, {"bleep": table}, {}


def _suite(feats, data: EvalData, name: str):
    primary = name == "img"  # the image embedding's probe keys are unprefixed (probe_*, label_*)
    m, table = probe_suite(
        feats, data, prefix="" if primary else f"{name}_", mix_prefix=f"{name}_", expression=primary
    )
    return m, ({"contrastive": table} if table is not None else {}), {}


def _baselines(data: EvalData, features):
    m, tables = run_baselines(data, features)
    return m, {f"baseline_{k}": t for k, t in tables.items()}, {}


def _steps(embs: dict, data: EvalData, features) -> dict[str, Step]:
    """The evaluation steps that apply to this data, as thunks (run under a progress bar)."""
    img, gene = embs["img"], embs["gene"]
    steps: dict[str, Step] = {}
    if gene is not None and len(data.test_idx) >= 2:
        steps["retrieval"] = lambda: _retrieval(img, gene, data)
        if data.expr_log is not None:
            steps["bleep"] = lambda: _bleep(img, gene, data)
    for name, emb in embs.items():
        if emb is not None:
            steps[f"probes_{name}"] = lambda emb=emb, name=name: _suite(emb, data, name)
    if data.cfg.baselines and (features is not None or data.expr_log is not None):
        steps["baselines"] = lambda: _baselines(data, features)
    return steps


def write_embeddings(path: Path, obs: pd.DataFrame, **emb: np.ndarray | None) -> Path:
    """Write obs + embeddings (obsm) as .h5ad, atomically."""
    import anndata as ad

    clean = obs.copy()
    for col in clean.columns:
        if clean[col].dtype == object:
            clean[col] = clean[col].astype(str)
    clean.index = clean.index.astype(str)
    adata = ad.AnnData(
        obs=clean, obsm={k: np.asarray(v, np.float32) for k, v in emb.items() if v is not None}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".embeddings.", suffix=".h5ad")
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _tables(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([t.assign(features=name) for name, t in tables.items()], ignore_index=True)


def _plots(out: Path, embs: dict, data: EvalData, ranks, tables, comparison) -> dict[str, Path]:
    te, seed = data.test_idx, data.cfg.seed
    if len(te) > data.cfg.mixing_subsample:  # layouts of a seeded subsample keep UMAP cheap
        rng = np.random.default_rng(seed)
        te = np.sort(rng.choice(te, data.cfg.mixing_subsample, replace=False))
    arts: dict[str, Path] = {}
    for name, emb in embs.items():
        if emb is None or len(te) < 3:
            continue
        xy, method = plots.embedding_2d(emb[te], seed=seed)
        for key in dict.fromkeys(["donor", data.batch_key, data.label_key]):
            values = data.column(key, te)
            if values is not None:
                path = out / f"{method.lower()}_{name}_by_{key}.png"
                arts[path.stem] = plots.plot_embedding(
                    xy,
                    values,
                    title=f"{name} embedding ({method}), by {key}",
                    path=path,
                    method=method,
                )
    if ranks:
        arts["recall_curve"] = plots.plot_recall_curve(ranks, out / "recall_curve.png")
    if "contrastive" in tables:
        arts["pearson_hist"] = plots.plot_pearson_hist(
            tables["contrastive"], out / "pearson_hist.png", title="HEST probe, image embedding"
        )
    if len(comparison):
        arts["comparison_plot"] = plots.plot_comparison(comparison, out / "comparison.png")
    return arts


def evaluate_embeddings(
    *,
    img: np.ndarray,
    gene: np.ndarray | None,
    obs: pd.DataFrame,
    train_idx: np.ndarray | Sequence,
    test_idx: np.ndarray | Sequence,
    expr_log: np.ndarray | None,
    gene_names: Sequence[str] | None,
    cfg: EvalConfig,
    label_key: str | None,
    mutation_key: str | None,
    out_dir: str | Path,
    baseline_features: np.ndarray | Mapping[str, np.ndarray] | None = None,
    batch_key: str = "donor",
    split: str = "test",
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Evaluate embeddings of all rows (obs order); metrics are named ``{split}/{key}``.

    ``train_idx`` / ``test_idx``: integer indices or boolean masks into the rows.
    ``baseline_features``: frozen image-encoder features (N x F), or ``{name: features}``.
    Artifacts: ``embeddings`` (.h5ad of the test rows: obsm img/gene/joint + obs), the
    per-gene Pearson and comparison tables (.csv) and, with ``cfg.plots``, PNGs.
    """
    _check(img, gene, obs, expr_log, gene_names, batch_key)
    n = len(obs)
    data = EvalData(
        obs=obs.reset_index(drop=True),
        train_idx=_as_index(train_idx, n, "train_idx"),
        test_idx=_as_index(test_idx, n, "test_idx"),
        expr_log=None if expr_log is None else np.asarray(expr_log, np.float32),
        gene_names=None if gene_names is None else [str(g) for g in gene_names],
        label_key=label_key,
        mutation_key=mutation_key,
        batch_key=batch_key,
        cfg=cfg,
    )
    img = l2_normalize(img)
    gene = None if gene is None else l2_normalize(gene)
    embs = {"img": img, "gene": gene, "joint": None if gene is None else joint_embedding(img, gene)}
    metrics: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    ranks: dict[str, np.ndarray] = {}
    steps = _steps(embs, data, baseline_features)
    for name in tqdm(steps, desc="evaluate", disable=not progress):
        m, t, r = steps[name]()
        metrics.update(m)
        tables.update(t)
        ranks.update(r)
    arts = _artifacts(Path(out_dir), obs, embs, data, ranks, tables, metrics, baseline_features)
    return {f"{split}/{k}": float(v) for k, v in metrics.items()}, arts


def _artifacts(out: Path, obs, embs, data, ranks, tables, metrics, features) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    te = data.test_idx
    arts = {
        "embeddings": write_embeddings(
            out / "embeddings.h5ad",
            obs.iloc[te],
            **{k: None if v is None else v[te] for k, v in embs.items()},
        )
    }
    if tables:
        arts["per_gene_pearson"] = _write_csv(
            _tables(tables), out / "per_gene_pearson.csv", index=False
        )
    comparison = comparison_table(
        metrics, list(as_baselines(features)) if data.cfg.baselines else []
    )
    if len(comparison):
        arts["comparison"] = _write_csv(comparison, out / "comparison.csv", index=True)
    if data.cfg.plots:
        arts.update(_plots(out, embs, data, ranks, tables, comparison))
    return arts


def _write_csv(frame: pd.DataFrame, path: Path, *, index: bool) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=index)
    os.replace(tmp, path)
    return path
