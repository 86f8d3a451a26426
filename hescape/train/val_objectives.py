"""Cheap validation objectives a scheduler can read at every evaluation step (opt-in by name).

Validation retrieval (``val/r5_img2gene`` ...) is always computed (``validate``). These are
computed only when the study names them, as a ``sweep.objectives`` metric or
``train.best_metric`` (``requested``), so a study that does not name them pays nothing.
All read the validation donors only, and each is bounded in cost:

``val/{img,gene,joint}/ilisi``
    Batch (donor) mixing of the image, gene or joint (the two L2-normalised embeddings
    side by side) embedding of the validation spots: scib-metrics' ``ilisi_knn``
    (``hescape.metrics.mixing``: exact 90-NN, perplexity 30, median LISI scaled to [0, 1])
    on a donor-stratified, seeded subsample of at most ``MIXING_MAX_ROWS`` = 1000 rows (one
    1000 x 1000 distance product: ~0.1 s on one core at 128 dims). With the validation donors
    as the batches: higher = donors mixed.
``val/{img,gene}/ridge_donor_cv_pearson``
    Expression kept: ridge (StandardScaler -> PCA (``eval.probe_pca``, capped by rows and
    dimensions) -> Ridge(``eval.probe_alpha``), ``metrics.probes.ridge_per_donor_probe``)
    from the image or gene embedding to the log-normalised raw expression of
    ``eval.probe_top_genes`` genes, cross-validated over the validation donors with the
    donors as groups (at most ``PROBE_MAX_FOLDS`` = 5 folds, each fold's donors predicted by
    a ridge fitted on the other validation donors); Pearson r per gene within each held-out
    donor, mean over genes, mean over donors. At most ``PROBE_MAX_ROWS`` = 2000 validation
    rows (donor-stratified, seeded). The genes are the most variable on the *training*
    donors (a seeded sample of at most ``GENE_FIT_MAX_ROWS`` = 5000 training rows, chosen
    once per process), so the validation donors choose nothing. Not the test-time
    ``ridge_per_donor`` probe (fitted on training donors): a cross-validated figure on the
    validation donors, comparable between trials of one study.

Both need at least 2 validation donors (mixing is between donors; the probe's folds are
donors): with fewer, the trial fails at its first evaluation with a message saying so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIXING_MAX_ROWS = 1000
PROBE_MAX_ROWS = 2000
PROBE_MAX_FOLDS = 5
GENE_FIT_MAX_ROWS = 5000
ILISI = {f"val/{t}/ilisi": t for t in ("img", "gene", "joint")}
RIDGE = {f"val/{t}/ridge_donor_cv_pearson": t for t in ("img", "gene")}
NAMES = (*ILISI, *RIDGE)
_CACHE: dict[tuple, Any] = {}  # per process: probe genes and targets per dataset and split


def requested(cfg: Any) -> tuple[str, ...]:
    """The cheap objectives ``cfg`` names (``sweep.objectives``, ``train.best_metric``)."""
    named = [cfg.train.best_metric]
    if cfg.sweep is not None:
        named += [o.metric for o in cfg.sweep.objectives]
    return tuple(n for n in NAMES if n in named)


def objective_inputs(data: Any, cfg: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """What ``objective_metrics`` needs beyond the validation embeddings (plain arrays):
    the probe's target expression and its rows (positions within the validation rows)."""
    if not names:
        return {"names": ()}
    donors = data.donor_names[data.val_idx]
    n_donors = len(np.unique(donors))
    if n_donors < 2:
        raise ValueError(
            f"{list(names)} need >= 2 validation donors (mixing is between donors; the probe "
            f"cross-validates over donors); this split has {n_donors}. Raise "
            "data.split.val_fraction (or use more donors), or drop them from "
            "sweep.objectives / train.best_metric")
    out: dict[str, Any] = {"names": tuple(names)}
    if any(n in RIDGE for n in names):
        out.update(probe_target(data, cfg.eval.probe_top_genes, seed=cfg.eval.seed))
    return out


def probe_target(data: Any, n_top: int, *, seed: int = 0) -> dict[str, Any]:
    """The probe's rows (positions in the validation rows, <= ``PROBE_MAX_ROWS``), their
    log-normalised expression of the ``probe_genes`` and the genes' names; cached per
    process (the same at every evaluation of a trial)."""
    from hescape.metrics.mixing import stratified_subsample

    val_donors = tuple(np.unique(data.donor_names[data.val_idx]))
    key = ("target", data.paired.fingerprint, tuple(data.train_donors), val_donors,
           int(n_top), int(seed))
    if key not in _CACHE:
        rows = stratified_subsample(data.donor_names[data.val_idx], PROBE_MAX_ROWS, seed=seed)
        genes = probe_genes(data, n_top, seed=seed)
        _remember(key, {"probe_rows": rows,
                        "probe_expr": _log_expression(data, data.val_idx[rows], genes),
                        "probe_genes": [str(data.paired.adata.var_names[g]) for g in genes]})
    return _CACHE[key]


def objective_metrics(emb: dict[str, Any], extra: dict[str, Any], ec: Any) -> dict[str, float]:
    """The requested objectives from the validation embeddings ``emb`` (``img``, ``gene``,
    ``donors``: every validation row) and ``objective_inputs``' ``extra``."""
    names = extra.get("names", ())
    out: dict[str, float] = {}
    for name in names:
        if name in ILISI:
            out[name] = validation_ilisi(_tower(emb, ILISI[name]), emb["donors"], seed=ec.seed)
        else:
            rows = extra["probe_rows"]
            out[name] = validation_ridge(
                _tower(emb, RIDGE[name])[rows], extra["probe_expr"],
                np.asarray(emb["donors"])[rows], extra["probe_genes"], pca=ec.probe_pca,
                alpha=ec.probe_alpha)
    return out


def validation_ilisi(emb: np.ndarray, donors: np.ndarray, *, seed: int = 0) -> float:
    """scib-metrics' iLISI of ``emb`` over ``donors`` on <= ``MIXING_MAX_ROWS`` rows."""
    from hescape.metrics.mixing import mixing_metrics

    return float(mixing_metrics(emb, donors, subsample=MIXING_MAX_ROWS, seed=seed)["ilisi"])


def validation_ridge(emb: np.ndarray, expr: np.ndarray, donors: np.ndarray,
                     gene_names: list[str], *, pca: int, alpha: float) -> float:
    """Donor-grouped cross-validated ridge from ``emb`` to ``expr``: mean over donors of the
    per-donor mean Pearson r over genes (see the module docstring)."""
    from sklearn.model_selection import GroupKFold
    from threadpoolctl import threadpool_limits

    from hescape.metrics.pearson import per_donor_means
    from hescape.metrics.probes import ridge_per_donor_probe

    donors = np.asarray(donors).astype(str)
    folds = min(len(np.unique(donors)), PROBE_MAX_FOLDS)
    per_donor = []
    with threadpool_limits(limits=1):  # small products: threads only wait on each other
        for fit, held in GroupKFold(n_splits=folds).split(emb, groups=donors):
            _, table = ridge_per_donor_probe(
                emb[fit], expr[fit], emb[held], expr[held], test_donors=donors[held],
                gene_names=gene_names, n_top=len(gene_names), pca=pca, alpha=alpha)
            per_donor.append(per_donor_means(table, "r")["value"].to_numpy())
    values = np.concatenate(per_donor)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def probe_genes(data: Any, n_top: int, *, seed: int = 0) -> np.ndarray:
    """Indices of the ``n_top`` most variable genes (log-normalised) on the training donors
    (a seeded sample of <= ``GENE_FIT_MAX_ROWS`` training rows); cached per process."""
    from hescape.metrics.probes import top_variable_genes

    key = ("genes", data.paired.fingerprint, tuple(data.train_donors), int(n_top), int(seed))
    if key not in _CACHE:
        rows = data.train_idx
        if len(rows) > GENE_FIT_MAX_ROWS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, GENE_FIT_MAX_ROWS,
                                                              replace=False))
        expr = _log_expression(data, rows, np.arange(data.paired.adata.n_vars))
        _remember(key, top_variable_genes(expr, n_top))
    return _CACHE[key]


def _remember(key: tuple, value: Any) -> None:
    if len(_CACHE) >= 16:  # a process serves few datasets/splits: keep the cache small
        _CACHE.clear()
    _CACHE[key] = value


def _log_expression(data: Any, rows: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Library-size-normalised log1p raw counts of ``rows`` (all genes normalise), ``genes``."""
    from hescape.preprocess.expression import normalize_log1p

    return normalize_log1p(data.paired.adata[np.asarray(rows)])[:, genes]


def _tower(emb: dict[str, Any], tower: str) -> np.ndarray:
    if tower == "joint":
        return np.concatenate([np.asarray(emb["img"]), np.asarray(emb["gene"])], axis=1)
    return np.asarray(emb[tower])
