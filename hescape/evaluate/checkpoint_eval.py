"""Evaluate a trained checkpoint on a canonical dataset (what ``hescape evaluate`` runs).

The dataset may be the training one or another cohort; its own manifest split decides
which rows fit the probes (``train``) and which are scored (``test_part``). The checkpoint's
expression preprocessing is re-applied to the dataset (same variant, through the
preprocessing cache) and must yield the checkpoint's feature names. Image-only datasets
(no counts) get image embeddings and the image-side probes (mutation, label, mixing).
The frozen-image baseline is the checkpoint's image encoder as configured before
contrastive training (its pretrained weights, or the fixed-seed random init). A frozen
backbone evaluated on its training dataset reads the study's feature cache (the checkpoint's
``features_path``) for both the model's image embeddings and that baseline: no patch is
encoded again (identical metrics, tested).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hescape.atomic import write_text
from hescape.config import EvalConfig, StudyConfig
from hescape.evaluate.baselines import as_baselines
from hescape.evaluate.pipeline import evaluate_embeddings
from hescape.evaluate.probe_spec import EvalData
from hescape.paths import absolute

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


def training_features(model, meta: dict, paired) -> np.ndarray | None:
    """The training run's frozen-backbone feature cache (memmapped), when it is this
    dataset's (same fingerprint, one row per obs) and the backbone is frozen; else None."""
    path = meta.get("features_path")
    if not (model.image_frozen and path and Path(path).is_file()
            and meta.get("fingerprint") == paired.fingerprint):
        return None
    feats = np.load(path, mmap_mode="r")
    return feats if feats.ndim == 2 and feats.shape[0] == paired.adata.n_obs else None


def frozen_features(cfg: StudyConfig, paired, rows, *, stain, compute, batch_size, progress):
    """Features of the pre-contrastive image encoder, or None (warned) if it cannot be built."""
    from hescape.train.features import encode_patches, frozen_image_encoder

    try:
        encoder = frozen_image_encoder(cfg)
    except (OSError, ValueError, RuntimeError) as exc:
        warnings.warn(f"frozen-image baseline skipped: {exc}", UserWarning, stacklevel=2)
        return None
    return encode_patches(encoder, paired.patches, rows=rows, compute=compute,
                          batch_size=batch_size, stain=stain, progress=progress)


def _expression(cfg: StudyConfig, meta: dict, paired) -> tuple[Any, Any, Any, list[str] | None]:
    """(model input, log-normalised expression, raw counts, gene names), or Nones for
    image-only data."""
    if not paired.manifest.get("has_expression", True) or paired.adata.n_vars == 0:
        return None, None, None, None
    from hescape.preprocess import normalize_log1p
    from hescape.train.inputs import prepare_expression

    prepared = prepare_expression(cfg, paired, progress=False)
    want = meta.get("feature_names")
    if want is not None and list(prepared.feature_names) != list(want):
        raise ValueError(
            "the dataset's prepared expression features differ from the checkpoint's "
            f"({len(prepared.feature_names)} vs {len(want)}): different gene panel or preprocessing"
        )
    names = list(map(str, paired.adata.var_names))
    return prepared.X, normalize_log1p(paired.adata), paired.adata.X, names


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
    """Embed ``train`` + ``test_part`` rows of ``dataset`` with the checkpoint's model and run
    ``evaluate_embeddings``; also writes ``metrics.json`` into ``out_dir``.

    ``eval_overrides``: ``key=value`` strings applied to the checkpoint's ``eval`` section
    (``ks=[1,5]``, ``eval.baselines=false``).
    """
    from hescape.data import load_paired
    from hescape.train.checkpoint import load_model
    from hescape.train.device import Compute
    from hescape.train.embed import compute_embeddings
    from hescape.train.inputs import fit_stain

    model, cfg, meta = load_model(ckpt_dir)
    compute = Compute.of(cfg.train, device)  # the training's precision rule, on this device
    paired = load_paired(dataset, require_expression=False)
    train, test = paired.indices("train"), paired.indices(test_part)
    if not len(train) or not len(test):
        raise ValueError(f"{dataset}: split needs train and {test_part!r} donors ({paired.split})")
    rows = np.union1d(train, test)
    gene_x, expr_log, counts, gene_names = _expression(cfg, meta, paired)
    stain = fit_stain(cfg, paired)
    kw = dict(stain=stain, compute=compute, batch_size=batch_size, progress=progress)
    cached = training_features(model, meta, paired)  # frozen backbone: encoded once per study
    source = {"images": paired.patches} if cached is None else {"features": cached}
    emb = compute_embeddings(model, gene_x=gene_x, rows=rows, **source, **kw)
    ecfg = eval_config(cfg.eval, eval_overrides or [])
    baseline = None
    if ecfg.baselines:
        baseline = (np.asarray(cached[rows], dtype=np.float32) if cached is not None
                    else frozen_features(cfg, paired, rows, **kw))
    data = EvalData(
        obs=paired.adata.obs.iloc[rows], img=emb["img"], gene=emb["gene"], cfg=ecfg,
        train_idx=np.searchsorted(rows, train), test_idx=np.searchsorted(rows, test),
        expr_log=None if expr_log is None else expr_log[rows],
        counts=None if counts is None else counts[rows], gene_names=gene_names,
        label_key=label_key or cfg.data.label_key,
        mutation_key=mutation_key or cfg.data.mutation_key, batch_key=cfg.data.batch_key,
        baselines=as_baselines(baseline),
    )
    metrics, arts = evaluate_embeddings(data, out_dir=out_dir, split=test_part, progress=progress)
    path = write_text(Path(out_dir) / "metrics.json",
                      json.dumps(metrics, indent=1, sort_keys=True, allow_nan=True))
    arts["metrics"] = path
    return metrics, arts
