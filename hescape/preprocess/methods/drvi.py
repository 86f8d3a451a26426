"""``drvi``: DRVI (Moinfar & Theis; PyPI ``drvi-py``, built on scvi-tools) with the batch as
categorical covariate, HESCAPE's gene-side representation; options under
``preprocess.expression.drvi``.

HESCAPE (peng-lab/hescape, ``experiments/drvi_pretrain/train.py``) trains DRVI on raw counts
with the sample as categorical covariate (``categorical_covariate_keys=["name"]``), 128
latent dimensions and 128-128 encoder/decoder layers (DRVI's tutorial settings); its best
retrieval configurations all sit on that latent. Here the covariate is the study's batch
column (``data.batch_key``: donor or slide) unless ``covariate_key`` names another obs column.

- ``inductive`` (default): DRVI trains on the training donors only. With
  ``encode_covariates: true`` (default; DRVI's query-to-reference recipe, which needs the
  encoder to see the covariate) held-out donors are new covariate categories mapped with
  scArches (``DRVI.load_query_data``, DRVI's own ``DRVIArchesMixin``: only the new
  categories' weights train, weight decay 0). With ``encode_covariates: false`` (DRVI's
  default architecture, HESCAPE's run) the encoder never sees the covariate: held-out donors
  are encoded by the trained encoder as they are, nothing trains on them. Either way the
  training rows come from the reference model and never depend on held-out data.
- ``transductive``: one DRVI over every row; flagged ``saw_heldout``.

Training length as for ``scvi``: ``max_epochs: null`` is scvi-tools' rule
``min(round(20000 / n_cells * 400), 400)`` (what HESCAPE used for DRVI), the KL warm-up spans
``min(max_epochs, 400)`` epochs (DRVI's tutorial: the whole run below 400 epochs), and with
``early_stopping`` a ``validation_fraction`` of the cells is held out and training stops when
their ELBO has not improved for ``early_stopping_patience`` epochs. ``info`` records the same
keys as scVI (``epochs_run``, ``max_epochs``, ``early_stopped``, ``stopped_on_cap``,
``elbo_validation_tail_change``, ``query_*`` for the scArches query, ``converged``) plus
``n_epochs_kl_warmup``, ``drvi_version`` and ``heldout_mapping``.

Output: the posterior mean of the latent (N x n_latent, kind "features": signed values), so
only gene encoders that take signed features sit on it. Measurements: docs/preprocessing.md.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Optional

import numpy as np
from pydantic import Field
from scipy import sparse

from hescape.preprocess.expression import MethodInput, MethodOutput, check_batch_key
from hescape.preprocess.methods.scvi import (
    VaeOptions,
    _cpu_threads,
    _quiet,
    check_integer_counts,
    train,
)
from hescape.preprocess.spec import MethodSpec, register

SEED = 0
KL_WARMUP_CAP = 400  # scvi-tools' default n_epochs_kl_warmup (DRVI tutorial: no change >= 400)
COVARIATE = "_hescape_drvi_covariate"


class DrviOptions(VaeOptions):
    n_latent: int = Field(128, ge=2, description="latent dimensions (DRVI tutorial, HESCAPE)")
    n_layers: int = Field(2, ge=1, description="hidden layers of encoder and of decoder")
    n_hidden: int = Field(128, ge=8, description="width of each hidden layer")
    covariate_key: Optional[str] = Field(  # noqa: UP045 - pydantic field type
        None, min_length=1,
        description="obs column DRVI conditions on; null = data.batch_key (donor or slide)")
    encode_covariates: bool = Field(
        True, description="encoder sees the covariate (needed for scArches query mapping); "
        "false = DRVI's default, held-out donors encoded without query training")


def check_input(adata: Any, opts: DrviOptions) -> None:
    """Before fitting: whole-number counts (DRVI's count likelihood) and the covariate column."""
    if opts.covariate_key is not None and opts.covariate_key not in adata.obs.columns:
        raise ValueError(f"preprocess.expression.drvi.covariate_key={opts.covariate_key!r} is "
                         "not an obs column; available: "
                         f"{', '.join(map(str, adata.obs.columns)) or '(none)'} (null uses "
                         "data.batch_key)")
    check_integer_counts(adata, opts, "drvi", "DRVI")


def covariate_values(inp: MethodInput, opts: DrviOptions) -> np.ndarray:
    """The covariate per row (str): ``covariate_key``'s column, else the batches.

    Raises unless the training rows hold >= 2 categories (nothing to condition on)."""
    if opts.covariate_key is None:
        values = inp.batches
    else:
        values = check_batch_key(inp.adata, opts.covariate_key, need_batches=True)
    n_train = len(np.unique(values[inp.train_mask]))
    if n_train < 2:
        name = opts.covariate_key or "the batch key"
        raise ValueError(f"preprocess.expression.drvi: the training rows hold {n_train} "
                         f"category of {name}; DRVI's covariate needs >= 2 (set "
                         "preprocess.expression.drvi.covariate_key to another obs column)")
    return values


def _counts_adata(inp: MethodInput, genes: np.ndarray, covariate: np.ndarray) -> Any:
    from anndata import AnnData

    x = sparse.csr_matrix(inp.adata.X, dtype=np.float32)[:, genes]
    out = AnnData(X=x)
    out.obs_names = inp.adata.obs_names.astype(str)
    out.var_names = inp.adata.var_names[genes].astype(str)
    out.obs[COVARIATE] = covariate
    return out


def _cap(opts: DrviOptions, n_cells: int) -> int:
    from scvi.model._utils import get_max_epochs_heuristic

    return opts.max_epochs or get_max_epochs_heuristic(n_cells)


def _fit(model: Any, opts: DrviOptions, progress: bool, prefix: str = "",
         **plan: Any) -> dict[str, Any]:
    """Train with the resolved epoch cap and DRVI's KL warm-up; returns the info keys."""
    cap = _cap(opts, model.adata.n_obs)
    warmup = min(cap, KL_WARMUP_CAP)
    info = train(model, opts.model_copy(update={"max_epochs": cap}), progress, prefix,
                 n_epochs_kl_warmup=warmup, **plan)
    info[f"{prefix}n_epochs_kl_warmup"] = warmup
    return info


def _latent(model: Any, data: Any) -> np.ndarray:
    return np.asarray(model.get_latent_representation(data), dtype=np.float32)


def run(inp: MethodInput, opts: DrviOptions) -> MethodOutput:
    """Fit DRVI (see module doc); the checks ran in ``apply_expression_variant``."""
    import drvi
    import scvi
    from drvi.model import DRVI

    covariate = covariate_values(inp, opts)
    mask = inp.train_mask
    genes = inp.genes(inp.log_expression())
    data = _counts_adata(inp, genes, covariate)
    inductive = opts.mode == "inductive" and not mask.all()
    ref = data[mask].copy() if inductive else data
    dims = [opts.n_hidden] * opts.n_layers
    info: dict[str, Any] = {
        "mode": opts.mode, "n_genes": int(len(genes)), "drvi_version": drvi.__version__,
        "covariate_key": opts.covariate_key or "batch_key",
        "n_covariate_train": int(len(np.unique(covariate[mask])))}
    out = np.empty((inp.adata.n_obs, opts.n_latent), dtype=np.float32)
    # DRVI prints every frozen/resized tensor while mapping a query: keep it off the log
    with _quiet(), _cpu_threads(), contextlib.redirect_stdout(io.StringIO()):
        scvi.settings.seed = SEED
        DRVI.setup_anndata(ref, categorical_covariate_keys=[COVARIATE], is_count_data=True)
        model = DRVI(ref, n_latent=opts.n_latent, encoder_dims=dims, decoder_dims=dims,
                     encode_covariates=opts.encode_covariates)
        info.update(_fit(model, opts, inp.progress))
        out[mask if inductive else slice(None)] = _latent(model, ref)
        if inductive:
            query = data[~mask].copy()
            DRVI.prepare_query_anndata(query, model)
            qmodel = DRVI.load_query_data(query, model)
            if opts.encode_covariates:
                info.update(_fit(qmodel, opts, inp.progress, prefix="query_",
                                 weight_decay=0.0))
                info["heldout_mapping"] = "scarches"
            else:
                # the encoder takes no covariate: the frozen reference encoder maps the new
                # donors as they are (HESCAPE's inference), nothing trains on them
                qmodel.is_trained_ = True
                info["heldout_mapping"] = "encoder"
            out[~mask] = _latent(qmodel, query)
    info["converged"] = not (info["stopped_on_cap"] or info.get("query_stopped_on_cap", False))
    return MethodOutput(X=out, feature_names=[f"drvi_{i + 1}" for i in range(out.shape[1])],
                        info=info)


SPEC = register(MethodSpec(
    name="drvi",
    summary="DRVI (drvi-py) latent, batch as categorical covariate (HESCAPE's gene side)",
    run=run,
    options=DrviOptions,
    needs_batches=True,
    heldout="inductive: held-out donors mapped as new covariate categories with scArches "
            "(DRVI.load_query_data), or encoded by the trained covariate-blind encoder "
            "(encode_covariates: false); transductive: one model over every donor",
    output="features",
    protocols=("inductive", "transductive"),
    check_input=check_input,
))
