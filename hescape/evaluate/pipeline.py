"""The evaluation pipeline: one ``EvalData`` in, ``{split}/...`` metrics and artifacts out.

It loops the probe registry (``probe_spec.probe_specs()``): pair probes (retrieval, fixed-
gallery retrieval, BLEEP) run once on the two towers; feature-set probes run on every
feature set: ``img``, ``gene``, ``joint`` (L2-normalised concatenation of the normalised
towers, so its cosine is the mean of theirs) and, with ``eval.baselines``, ``baseline_{name}``
for each image-feature baseline and ``baseline_pca`` (PCA of expression, fit on the training
rows). A probe that predicts expression skips feature sets computed from expression.
Keys: ``{split}/{metric}`` (pair) and ``{split}/{features}/{metric}``.

The mutation probe uses train + test rows with its own donor-grouped CV; every other probe
fits on ``train_idx`` and scores ``test_idx``. Artifacts: embeddings.h5ad (test rows),
per_donor.csv, probe_notes.json, per_gene_pearson.csv, comparison.csv and PNGs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from hescape.atomic import atomic_path, write_text
from hescape.evaluate import plots
from hescape.evaluate.baselines import comparison_table, pca_expression
from hescape.evaluate.probe_spec import (
    PER_DONOR_COLUMNS,
    EvalData,
    ProbeResult,
    ProbeSpec,
    metric_key,
    probe_specs,
)
from hescape.metrics.retrieval import l2_normalize


@dataclass(frozen=True)
class FeatureSet:
    """One matrix the feature-set probes run on (rows in obs order)."""

    name: str
    X: np.ndarray
    from_expression: bool


def joint_embedding(img: np.ndarray, gene: np.ndarray | None) -> np.ndarray:
    """L2-normalised concatenation of the normalised image and gene embeddings."""
    img = l2_normalize(img)
    return img if gene is None else l2_normalize(np.hstack([img, l2_normalize(gene)]))


def feature_sets(data: EvalData) -> list[FeatureSet]:
    """The trained embeddings (none in a baselines-only evaluation), then (with
    ``eval.baselines``) the baselines."""
    sets = [] if data.img is None else [FeatureSet("img", data.img, False)]
    if data.gene is not None:
        sets += [FeatureSet("gene", data.gene, True),
                 FeatureSet("joint", joint_embedding(data.img, data.gene), True)]  # fmt: skip
    if data.cfg.baselines:
        sets += [FeatureSet(f"baseline_{name}", np.asarray(x, np.float32), False)
                 for name, x in data.baselines.items()]  # fmt: skip
        if data.expr_log is not None and data.pca_baseline:
            pca = pca_expression(data.expr_log, data.train_idx, seed=data.cfg.seed)
            sets.append(FeatureSet("baseline_pca", pca, True))
    return sets


@dataclass
class Collected:
    """Everything the probes returned, keys already prefixed by feature set."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_donor: list[pd.DataFrame] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, spec: ProbeSpec, features: str | None, result: ProbeResult) -> None:
        prefix = "" if features is None else f"{features}/"
        self.metrics.update({prefix + k: float(v) for k, v in result.metrics.items()})
        if result.per_donor is not None and len(result.per_donor):
            self.per_donor.append(result.per_donor.assign(metric=prefix + result.per_donor["metric"]))
        for name, table in result.tables.items():
            self.tables[f"{prefix}{spec.name}/{name}"] = table.assign(
                features=features or "pair", probe=spec.name)  # fmt: skip
        if result.note:
            self.notes[prefix + spec.name] = result.note
        self.ranks.update(result.ranks)


def _run(spec: ProbeSpec, features: FeatureSet | None, data: EvalData, out: Collected) -> None:
    where = spec.name if features is None else f"{features.name}/{spec.name}"
    try:
        result = spec.run(data) if features is None else spec.run(features.X, data)
    except ValueError as exc:  # a probe that cannot run on this data says why
        warnings.warn(f"probe {where} skipped: {exc}", UserWarning, stacklevel=2)
        out.notes[where] = f"skipped: {exc}"
        return
    if result is not None:
        out.add(spec, None if features is None else features.name, result)


def run_probes(data: EvalData, *, progress: bool = False) -> Collected:
    """Every applicable (probe, feature set) pair, under one progress bar."""
    sets = feature_sets(data)
    jobs: list[tuple[ProbeSpec, FeatureSet | None]] = []
    for spec in probe_specs():
        if spec.scope == "pair":
            jobs += [(spec, None)] if spec.applies(data) else []
        else:
            jobs += [(spec, fs) for fs in sets if spec.applies(data, from_expression=fs.from_expression)]
    out = Collected()
    for spec in probe_specs():  # a role whose obs column is unset: say why the probe is absent
        unset = [r for r in spec.obs if data.key_of(r) is None]
        if unset:
            out.notes[spec.name] = (f"skipped: no {'/'.join(unset)} column configured "
                                    f"(data.{unset[0]}_key: null)")
    for spec, fs in tqdm(jobs, desc="evaluate", disable=not progress):
        _run(spec, fs, data, out)
    return out


def evaluate_embeddings(
    data: EvalData, *, out_dir: str | Path, split: str = "test", progress: bool = True,
    embedding_plots: bool = True,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Run every registered probe on ``data``; metrics named ``{split}/[{features}/]{name}``.

    Embeddings are L2-normalised first. Artifacts: ``embeddings`` (.h5ad of the test rows:
    obsm img/gene/joint + obs; not in a baselines-only evaluation), ``per_donor`` (.csv:
    metric, donor, value, n), ``probe_notes`` (.json: why a figure is NaN or a probe was
    skipped), ``per_gene_pearson`` and ``comparison`` (.csv) and, with ``cfg.plots``, PNGs.
    ``embedding_plots=False`` leaves out the 2-D layouts (UMAP) of the embeddings, the
    costliest plots: a study draws them once, for its best trials, from ``embeddings.h5ad``
    (``plot_embeddings``).
    """
    img = None if data.img is None else l2_normalize(data.img)
    gene = None if data.gene is None else l2_normalize(data.gene)
    data = replace(data, img=img, gene=gene)
    collected = run_probes(data, progress=progress)
    metrics = {metric_key(split, *_split_prefix(k)): v for k, v in collected.metrics.items()}
    arts = _artifacts(Path(out_dir), data, collected, embedding_plots=embedding_plots)
    return metrics, arts


def _split_prefix(key: str) -> tuple[str, str | None]:
    features, _, metric = key.rpartition("/")
    return metric, features or None


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
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def _artifacts(out: Path, data: EvalData, got: Collected, *,
               embedding_plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    te = data.test_idx
    arts: dict[str, Path] = {}
    embs: dict[str, np.ndarray | None] = {}
    if data.img is not None:
        embs = {"img": data.img, "gene": data.gene,
                "joint": None if data.gene is None else joint_embedding(data.img, data.gene)}
        arts["embeddings"] = write_embeddings(out / "embeddings.h5ad", data.obs.iloc[te],
                                              **{k: None if v is None else v[te]
                                                 for k, v in embs.items()})  # fmt: skip
    per_donor = (pd.concat(got.per_donor, ignore_index=True)[PER_DONOR_COLUMNS] if got.per_donor
                 else pd.DataFrame(columns=PER_DONOR_COLUMNS))  # fmt: skip
    arts["per_donor"] = _write(out / "per_donor.csv", lambda p: per_donor.to_csv(p, index=False))
    notes = json.dumps(got.notes, indent=1, sort_keys=True)
    arts["probe_notes"] = write_text(out / "probe_notes.json", notes)
    if got.tables:
        genes = pd.concat(got.tables.values(), ignore_index=True)
        arts["per_gene_pearson"] = _write(out / "per_gene_pearson.csv",
                                          lambda p: genes.to_csv(p, index=False))  # fmt: skip
    comparison = comparison_table(got.metrics)
    if len(comparison):
        arts["comparison"] = _write(out / "comparison.csv", lambda p: comparison.to_csv(p))
    if data.cfg.plots:
        if embedding_plots and embs:
            arts.update(plot_embeddings(out, {k: None if v is None else v[te]
                                              for k, v in embs.items()},
                                        data.obs.iloc[te], cfg=data.cfg,
                                        keys=["donor", data.batch_key, data.label_key]))
        arts.update(_plots(out, data, got, comparison))
    return arts


def plot_embeddings(out: Path, embs: dict[str, np.ndarray | None], obs: pd.DataFrame, *,
                    cfg, keys: list[str | None]) -> dict[str, Path]:
    """2-D layouts (UMAP, else PCA) of held-out embeddings ``embs`` (rows of ``obs``),
    coloured by each obs column in ``keys``; a seeded subsample of ``cfg.mixing_subsample``
    rows keeps UMAP cheap. What ``evaluate_embeddings`` draws, and what a study draws for its
    best trials from their ``embeddings.h5ad``."""
    rows = np.arange(len(obs))
    if len(rows) > cfg.mixing_subsample:
        rng = np.random.default_rng(cfg.seed)
        rows = np.sort(rng.choice(rows, cfg.mixing_subsample, replace=False))
    arts: dict[str, Path] = {}
    for name, emb in embs.items():
        if emb is None or len(rows) < 3:
            continue
        xy, method = plots.embedding_2d(np.asarray(emb)[rows], seed=cfg.seed)
        for key in dict.fromkeys(k for k in keys if k is not None and k in obs.columns):
            path = out / f"{method.lower()}_{name}_by_{key}.png"
            arts[path.stem] = plots.plot_embedding(
                xy, obs[key].to_numpy()[rows], title=f"{name} embedding ({method}), by {key}",
                path=path, method=method,
            )  # fmt: skip
    return arts


def _plots(out: Path, data: EvalData, got: Collected, comparison) -> dict[str, Path]:
    arts: dict[str, Path] = {}
    if got.ranks:
        arts["recall_curve"] = plots.plot_recall_curve(got.ranks, out / "recall_curve.png")
    for probe, title in (("hest", "HEST probe"), ("ridge_per_donor", "per-donor ridge probe")):
        table = got.tables.get(f"img/{probe}/per_gene")
        if table is not None and table["pearson"].notna().any():
            arts["pearson_hist"] = plots.plot_pearson_hist(
                table, out / "pearson_hist.png", title=f"{title}, image embedding")
            break
    if len(comparison):
        arts["comparison_plot"] = plots.plot_comparison(comparison, out / "comparison.png")
    return arts


def _write(path: Path, writer) -> Path:
    """``writer(temporary path)``, then the file appears at ``path`` (``hescape.atomic``)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return path
