"""Evaluate a trained model on a canonical dataset (trials, and ``hescape evaluate``).

``evaluate_trained`` takes a ``hescape.train.trained.TrainedModel`` (which owns loading the
checkpoint, checking the dataset and its inputs against it, and embedding) and a loaded
dataset; ``evaluate_checkpoint`` loads both first. The dataset may be the training one or
another cohort; its own manifest split decides which rows fit the probes (``train``) and
which are scored (``test_part``). The checkpoint's expression preprocessing is re-applied
(same variant, through the preprocessing cache, or the study's precomputed variant) and must
yield the checkpoint's feature names. Image-only datasets (no counts) get image embeddings
and the image-side probes (mutation, label, mixing). The frozen-image baseline is the
checkpoint's image encoder as configured before contrastive training; a frozen backbone
evaluated on its training dataset reads the study's feature cache for both the model's image
embeddings and that baseline: no patch is encoded again (identical metrics, tested). In a
study the baselines are evaluated once per study (``hescape.study.baselines``), not here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from hescape.atomic import write_text
from hescape.config import EvalConfig, StudyConfig
from hescape.evaluate.baselines import as_baselines
from hescape.evaluate.pipeline import evaluate_embeddings
from hescape.evaluate.probe_spec import EvalData
from hescape.paths import absolute
from hescape.train.device import Compute
from hescape.train.trained import TrainedModel

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_checkpoint(ref: str, *, tracking_uri: str | None = None) -> Path:
    """A checkpoint directory, or an MLflow run id whose ``hescape.best_checkpoint`` tag
    (or ``checkpoint`` artifact folder) holds one."""
    path = absolute(ref)
    if path.is_dir():
        return path
    if not RUN_ID.match(ref):
        raise FileNotFoundError(f"{ref}: neither a checkpoint directory nor an MLflow run id")
    from mlflow.tracking import MlflowClient

    from hescape.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, "runs")
    run = MlflowClient(uri).get_run(ref)
    tagged = run.data.tags.get("hescape.best_checkpoint")
    if tagged and Path(tagged).is_dir():
        return Path(tagged)
    import mlflow.artifacts

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=ref, artifact_path="checkpoint", tracking_uri=uri
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; re-raise one clear error
        raise FileNotFoundError(
            f"run {ref} ({uri}): best checkpoint {tagged!r} is not on this machine and the run "
            f"has no 'checkpoint' artifact ({exc})"
        ) from None
    return Path(local)


def eval_config(base: EvalConfig, overrides: list[str]) -> EvalConfig:
    """``base`` with ``key=value`` overrides (an ``eval.`` prefix is optional), validated."""
    from pydantic import ValidationError

    from hescape.config import ConfigError, apply_override

    data = base.model_dump()
    for item in overrides:
        data = apply_override(data, item.removeprefix("eval."))
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"--set: invalid eval setting: {exc.errors()[0]['msg']} "
            f"({'.'.join(map(str, exc.errors()[0]['loc']))})"
        ) from None


def expression_views(paired) -> tuple[Any, Any, list[str] | None]:
    """(log-normalised expression, raw counts, gene names) of ``paired``; Nones for
    image-only data."""
    if not paired.manifest.get("has_expression", True) or paired.adata.n_vars == 0:
        return None, None, None
    from hescape.preprocess import normalize_log1p

    return normalize_log1p(paired.adata), paired.adata.X, list(map(str, paired.adata.var_names))


def eval_rows(paired, test_part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, ``test_part`` rows, their sorted union): what an evaluation embeds."""
    train, test = paired.indices("train"), paired.indices(test_part)
    if not len(train) or not len(test):
        raise ValueError(f"{paired.path}: split needs train and {test_part!r} donors "
                         f"({paired.split})")
    return train, test, np.union1d(train, test)


def evaluate_trained(
    trained: TrainedModel,
    paired: Any,
    *,
    out_dir: str | Path,
    test_part: str = "test",
    ecfg: EvalConfig | None = None,
    label_key: str | None = None,
    mutation_key: str | None = None,
    prepared: Any = None,
    features: Any = None,
    expression: tuple[Any, Any, list[str] | None] | None = None,
    baselines: bool = True,
    embedding_plots: bool = True,
    device: str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Embed the ``train`` + ``test_part`` rows of ``paired`` with ``trained`` and run
    ``evaluate_embeddings``; writes ``metrics.json`` into ``out_dir``.

    ``prepared`` / ``features``: the model's inputs when the caller has them (a study's
    precomputed variant and feature cache; checked by ``TrainedModel.inputs``);
    ``expression``: ``expression_views(paired)`` when the caller computed it already;
    ``baselines=False`` leaves the baseline feature sets out (a study evaluates them once,
    ``hescape.study.baselines``); ``embedding_plots=False`` leaves out the UMAPs.
    """
    ecfg = ecfg or trained.cfg.eval
    train, test, rows = eval_rows(paired, test_part)
    inputs = trained.inputs(paired, prepared=prepared, features=features, progress=progress)
    kw = dict(device=device, batch_size=batch_size, progress=progress)
    emb = trained.embed(inputs, rows, **kw)
    expr_log, counts, gene_names = expression if expression is not None else expression_views(paired)
    baseline = None
    if baselines and ecfg.baselines:
        baseline = trained.frozen_features(inputs, rows, **kw)
    cfg = trained.cfg
    data = EvalData(
        obs=paired.adata.obs.iloc[rows], img=emb.img, gene=emb.gene,
        cfg=ecfg if baselines else ecfg.model_copy(update={"baselines": False}),
        train_idx=np.searchsorted(rows, train), test_idx=np.searchsorted(rows, test),
        expr_log=None if expr_log is None else expr_log[rows],
        counts=None if counts is None else counts[rows], gene_names=gene_names,
        label_key=label_key or cfg.data.label_key,
        mutation_key=mutation_key or cfg.data.mutation_key, batch_key=cfg.data.batch_key,
        baselines=as_baselines(baseline),
    )
    metrics, arts = evaluate_embeddings(data, out_dir=out_dir, split=test_part,
                                        progress=progress, embedding_plots=embedding_plots)
    path = write_text(Path(out_dir) / "metrics.json",
                      json.dumps(metrics, indent=1, sort_keys=True, allow_nan=True))
    arts["metrics"] = path
    return metrics, arts


def evaluate_baselines(
    cfg: StudyConfig,
    paired: Any,
    *,
    out_dir: str | Path,
    frozen: bool = True,
    pca: bool = True,
    features: Any = None,
    test_part: str = "test",
    expression: tuple[Any, Any, list[str] | None] | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Path]]:
    """The baseline feature sets of ``cfg`` on ``paired`` alone, with the probes and rows of
    ``evaluate_trained`` (so the figures equal what a trial's evaluation gave them):
    ``baseline_frozen`` (``frozen``: the image encoder before contrastive training, read from
    ``features`` (the cache path of exactly that encoder on this dataset) when given, else
    encoded) and ``baseline_pca`` (``pca``: PCA of expression, fit on the training rows).
    What a study evaluates once instead of in every trial (``hescape.study.baselines``)."""
    train, test, rows = eval_rows(paired, test_part)
    expr_log, counts, gene_names = expression if expression is not None else expression_views(paired)
    feats = None
    if frozen:
        if features is not None:
            from hescape.train.features import load_features

            cached = features if isinstance(features, np.ndarray) else load_features(
                features, paired.adata.n_obs)
            feats = np.asarray(cached[rows], dtype=np.float32)
        else:
            from hescape.train.features import encode_patches, frozen_image_encoder
            from hescape.train.inputs import fit_stain

            feats = encode_patches(frozen_image_encoder(cfg), paired.patches, rows=rows,
                                   compute=Compute.of(cfg.train, device), batch_size=batch_size,
                                   stain=fit_stain(cfg, paired), progress=progress)
    data = EvalData(
        obs=paired.adata.obs.iloc[rows], cfg=cfg.eval.model_copy(update={"baselines": True}),
        train_idx=np.searchsorted(rows, train), test_idx=np.searchsorted(rows, test),
        expr_log=None if expr_log is None else expr_log[rows],
        counts=None if counts is None else counts[rows], gene_names=gene_names,
        label_key=cfg.data.label_key, mutation_key=cfg.data.mutation_key,
        batch_key=cfg.data.batch_key, baselines=as_baselines(feats), pca_baseline=pca,
    )
    metrics, arts = evaluate_embeddings(data, out_dir=out_dir, split=test_part,
                                        progress=progress)
    path = write_text(Path(out_dir) / "metrics.json",
                      json.dumps(metrics, indent=1, sort_keys=True, allow_nan=True))
    arts["metrics"] = path
    return metrics, arts


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    dataset: str | Path,
    *,
    out_dir: str | Path,
    test_part: str = "test",
    eval_overrides: list[str] | None = None,
    label_key: str | None = None,
    mutation_key: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Path]]:
    """``hescape evaluate``: load the checkpoint (``TrainedModel``) and ``dataset``, then
    ``evaluate_trained`` with the checkpoint's ``eval`` section plus ``eval_overrides``
    (``key=value`` strings: ``ks=[1,5]``, ``eval.baselines=false``)."""
    from hescape.data import load_paired
    from hescape.data.splits import with_fold

    trained = TrainedModel.load(ckpt_dir)
    paired = load_paired(dataset, require_expression=False)
    if trained.trained_on(paired):  # its own dataset: the donor fold it was trained on
        paired = with_fold(paired, trained.cfg)
    return evaluate_trained(
        trained, paired, out_dir=out_dir, test_part=test_part,
        ecfg=eval_config(trained.cfg.eval, eval_overrides or []), label_key=label_key,
        mutation_key=mutation_key, device=device, batch_size=batch_size, progress=progress)
