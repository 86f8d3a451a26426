"""scVI (scvi-tools) with the batch key as batch covariate; inductive (scArches) or transductive.

- ``inductive``: an scArches-ready reference SCVI (encoder sees the batch, layer norm, no
  batch norm: the scvi-tools scArches recipe) trains on training donors only; held-out donors
  are new batches mapped with ``SCVI.load_query_data`` (only the new batch's weights train)
  and a short query training. Training rows come from the reference model, so they never
  depend on held-out data.
- ``transductive``: one SCVI over every row; flagged ``saw_heldout``.

Output ``latent`` is the posterior mean (N x n_latent); ``normalized`` is the decoded
expression of every cell as if it came from the reference batch (the largest training
batch, ``transform_batch``), library size 1e4, log1p (N x G).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

import numpy as np
from anndata import AnnData
from scipy import sparse

from hescape.config import ExpressionPreprocess, ScviOptions
from hescape.preprocess.expression import (
    VARIANTS,
    PreparedExpression,
    counts_matrix,
    normalize_log1p,
    select_genes,
)

SEED = 0
LIBRARY_SIZE = 1e4
ARCHES = {"use_layer_norm": "both", "use_batch_norm": "none", "encode_covariates": True,
          "dropout_rate": 0.2}


def show_progress(progress: bool) -> bool:
    """``progress`` unless the user disabled tqdm globally (``TQDM_DISABLE``)."""
    return progress and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


@contextmanager
def _quiet():
    names = ("lightning", "lightning.pytorch", "pytorch_lightning", "scvi")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)


def _counts_adata(adata: AnnData, genes: np.ndarray, batches: np.ndarray) -> AnnData:
    x = counts_matrix(adata)
    x = sparse.csr_matrix(x)[:, genes].astype(np.float32)
    out = AnnData(X=x)
    out.obs_names = adata.obs_names.astype(str)
    out.var_names = adata.var_names[genes].astype(str)
    out.obs["batch"] = batches
    return out


def _train(model, epochs: int, progress: bool, **plan) -> None:
    model.train(max_epochs=epochs, accelerator="auto", devices=1, batch_size=128,
                enable_progress_bar=show_progress(progress), enable_model_summary=False,
                enable_checkpointing=False, train_size=1.0, plan_kwargs=plan or None)


def _output(model, data: AnnData, opts: ScviOptions, ref_batch: str) -> np.ndarray:
    if opts.output == "latent":
        return np.asarray(model.get_latent_representation(data), dtype=np.float32)
    expr = model.get_normalized_expression(data, transform_batch=[ref_batch],
                                           library_size=LIBRARY_SIZE, return_numpy=True)
    return np.log1p(np.asarray(expr)).astype(np.float32)


@VARIANTS.register("scvi")
def scvi_variant(adata: AnnData, cfg: ExpressionPreprocess, *, batches: np.ndarray,
                 train_mask: np.ndarray, progress: bool) -> PreparedExpression:
    """Fit scVI (see module doc); checks ran in ``apply_expression_variant``."""
    try:
        import scvi
        from scvi.model import SCVI
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the scvi variant needs scvi-tools: pip install scvi-tools") from exc
    opts = cfg.scvi
    genes = select_genes(normalize_log1p(adata), cfg.n_top_genes, train_mask)
    data = _counts_adata(adata, genes, batches)
    inductive = opts.mode == "inductive" and not train_mask.all()
    ref = data[train_mask].copy() if inductive else data
    names, counts = np.unique(batches[train_mask], return_counts=True)
    ref_batch = str(names[np.argmax(counts)])
    arch = dict(ARCHES) if opts.mode == "inductive" else {}
    info: dict = {"mode": opts.mode, "output": opts.output, "n_genes": int(len(genes)),
                  "reference_batch": ref_batch, "max_epochs": opts.max_epochs}
    with _quiet():
        scvi.settings.seed = SEED
        SCVI.setup_anndata(ref, batch_key="batch")
        model = SCVI(ref, n_latent=opts.n_latent, n_layers=opts.n_layers,
                     n_hidden=opts.n_hidden, **arch)
        _train(model, opts.max_epochs, progress)
        info["epochs"] = int(len(model.history["elbo_train"]))
        info["elbo_train"] = float(model.history["elbo_train"].iloc[-1, 0])
        out = np.empty((adata.n_obs, opts.n_latent if opts.output == "latent" else len(genes)),
                       dtype=np.float32)
        out[train_mask if inductive else slice(None)] = _output(model, ref, opts, ref_batch)
        if inductive:
            query = data[~train_mask].copy()
            SCVI.prepare_query_anndata(query, model)
            qmodel = SCVI.load_query_data(query, model)
            q_epochs = max(5, opts.max_epochs // 2)
            _train(qmodel, q_epochs, progress, weight_decay=0.0)
            out[~train_mask] = _output(qmodel, query, opts, ref_batch)
            info["query_epochs"] = q_epochs
            info["heldout_mapping"] = "scarches"
    names_out = ([f"scvi_{i + 1}" for i in range(out.shape[1])] if opts.output == "latent"
                 else [str(g) for g in data.var_names])
    return PreparedExpression(X=out, feature_names=names_out,
                              saw_heldout=not inductive and not bool(train_mask.all()),
                              method="scvi", info=info)
