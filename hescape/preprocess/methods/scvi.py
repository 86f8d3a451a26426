"""``scvi``: scVI (scvi-tools) with the batch key as batch covariate; options under
``preprocess.expression.scvi``.

- ``inductive`` (default): an scArches-ready reference SCVI (encoder sees the batch, layer
  norm, no batch norm: the scvi-tools scArches recipe) trains on training donors only;
  held-out donors are new batches mapped with ``SCVI.load_query_data`` (only the new
  batches' weights train). Training rows come from the reference model, so they never
  depend on held-out data.
- ``transductive``: one SCVI over every row; flagged ``saw_heldout``.

Training length: ``max_epochs: null`` (default) is scvi-tools' own rule
``min(round(20000 / n_cells * 400), 400)`` (``get_max_epochs_heuristic``), and with
``early_stopping`` (default) a ``validation_fraction`` of the cells is held out and
training stops when their ELBO has not improved for ``early_stopping_patience`` epochs.
``info`` records ``epochs_run``, ``max_epochs`` (the cap that applied), ``early_stopped``,
``stopped_on_cap`` (ran to the cap without the criterion firing: possibly unconverged),
``elbo_validation_tail_change`` (relative fall of the held-out ELBO over the last 10% of
epochs: how far from a plateau), the same with a ``query_`` prefix for the scArches query,
and ``converged`` (no model stopped on its cap). Measurements: docs/preprocessing.md.

Output ``latent`` is the posterior mean (N x n_latent, kind "features"); ``normalized`` is
the decoded expression of every cell as if it came from the reference batch (the largest
training batch), library size 1e4, log1p (N x G, kind "expression").
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field
from scipy import sparse

from hescape.preprocess.expression import MethodInput, MethodOutput, counts_matrix
from hescape.preprocess.spec import MethodOptions, MethodSpec, register

SEED = 0
LIBRARY_SIZE = 1e4
BATCH_SIZE = 128  # scvi-tools' default
CPU_THREADS = 1  # scVI's matrices are tiny: more torch threads only add synchronisation
ARCHES = {"use_layer_norm": "both", "use_batch_norm": "none", "encode_covariates": True,
          "dropout_rate": 0.2}


class VaeOptions(MethodOptions):
    """Architecture, training length and input checks shared by the scvi-tools models (scVI,
    DRVI); the defaults are scVI's, a subclass overrides them."""

    n_latent: int = Field(10, ge=2, description="latent dimensions")
    n_layers: int = Field(1, ge=1, description="hidden layers of encoder and of decoder")
    n_hidden: int = Field(128, ge=8, description="width of each hidden layer")
    max_epochs: Optional[int] = Field(  # noqa: UP045 - pydantic field type
        None, ge=1, description="null = scvi-tools' rule min(round(20000/n_cells*400), 400)")
    early_stopping: bool = Field(True, description="stop on the held-out cells' ELBO")
    early_stopping_patience: int = Field(45, ge=1, description="epochs (scvi-tools' default)")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5,
                                       description="cells held out for early stopping")
    mode: Literal["inductive", "transductive"] = "inductive"
    allow_non_integer: bool = False


class ScviOptions(VaeOptions):
    output: Literal["latent", "normalized"] = "latent"


def show_progress(progress: bool) -> bool:
    """``progress`` unless the user disabled tqdm globally (``TQDM_DISABLE``)."""
    return progress and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


@contextmanager
def _cpu_threads():
    """One torch thread while scVI trains on CPU, restored after (docs/preprocessing.md)."""
    import torch

    saved = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


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


def check_integer_counts(adata: Any, opts: VaeOptions, method: str = "scvi",
                         model: str = "scVI") -> None:
    """Raise unless ``adata.X`` holds whole numbers (the models' count likelihood)."""
    if opts.allow_non_integer:
        return
    x = adata.X
    data = x.data if sparse.issparse(x) else np.asarray(x)
    bad = data != np.round(data)
    if np.any(bad):
        example = data[bad].ravel()[0]
        raise ValueError(f"{model} models raw integer counts, but adata.X holds non-integers "
                         f"(e.g. {example!r}); pass the raw counts, or set "
                         f"preprocess.expression.{method}.allow_non_integer: true to proceed "
                         "anyway")


def _counts_adata(inp: MethodInput, genes: np.ndarray) -> Any:
    from anndata import AnnData

    x = sparse.csr_matrix(counts_matrix(inp.adata))[:, genes].astype(np.float32)
    out = AnnData(X=x)
    out.obs_names = inp.adata.obs_names.astype(str)
    out.var_names = inp.adata.var_names[genes].astype(str)
    out.obs["batch"] = inp.batches
    return out


def train(model: Any, opts: VaeOptions, progress: bool, prefix: str = "",
          **plan: Any) -> dict[str, Any]:
    """Train ``model`` with the configured length rule; returns what happened (info keys)."""
    stop = opts.early_stopping
    model.train(max_epochs=opts.max_epochs,  # None: scvi-tools applies its own rule
                accelerator="auto", devices=1, batch_size=BATCH_SIZE,
                enable_progress_bar=show_progress(progress), enable_model_summary=False,
                enable_checkpointing=False, plan_kwargs=plan or None,
                train_size=1.0 - opts.validation_fraction if stop else 1.0,
                early_stopping=stop, early_stopping_patience=opts.early_stopping_patience)
    history, cap = model.history, int(model.trainer.max_epochs)
    callback = model.trainer.early_stopping_callback
    early = bool(callback is not None and callback.stopped_epoch > 0)
    epochs = int(len(history["elbo_train"]))
    info = {"epochs_run": epochs, "max_epochs": cap, "early_stopped": early,
            "stopped_on_cap": not early and epochs >= cap,
            "elbo_train": float(history["elbo_train"].iloc[-1, 0])}
    if "elbo_validation" in history:
        elbo = history["elbo_validation"].iloc[:, 0].astype(float).to_numpy()
        tail = max(1, len(elbo) // 10)
        info["elbo_validation"] = float(elbo[-1])
        # how much the held-out ELBO still fell over the last 10% of epochs (relative)
        info["elbo_validation_tail_change"] = float((elbo[-1 - tail] - elbo[-1]) /
                                                    abs(elbo[-1])) if len(elbo) > 1 else 0.0
    return {f"{prefix}{k}": v for k, v in info.items()}


def _output(model: Any, data: Any, opts: ScviOptions, ref_batch: str) -> np.ndarray:
    if opts.output == "latent":
        return np.asarray(model.get_latent_representation(data), dtype=np.float32)
    expr = model.get_normalized_expression(data, transform_batch=[ref_batch],
                                           library_size=LIBRARY_SIZE, return_numpy=True)
    return np.log1p(np.asarray(expr)).astype(np.float32)


def run(inp: MethodInput, opts: ScviOptions) -> MethodOutput:
    """Fit scVI (see module doc); the checks ran in ``apply_expression_variant``."""
    import scvi
    from scvi.model import SCVI

    mask = inp.train_mask
    genes = inp.genes(inp.log_expression())
    data = _counts_adata(inp, genes)
    inductive = opts.mode == "inductive" and not mask.all()
    ref = data[mask].copy() if inductive else data
    names, counts = np.unique(inp.batches[mask], return_counts=True)
    ref_batch = str(names[np.argmax(counts)])
    arch = dict(ARCHES) if opts.mode == "inductive" else {}
    info: dict[str, Any] = {"mode": opts.mode, "output": opts.output,
                            "n_genes": int(len(genes)), "reference_batch": ref_batch}
    width = opts.n_latent if opts.output == "latent" else len(genes)
    out = np.empty((inp.adata.n_obs, width), dtype=np.float32)
    with _quiet(), _cpu_threads():
        scvi.settings.seed = SEED
        SCVI.setup_anndata(ref, batch_key="batch")
        model = SCVI(ref, n_latent=opts.n_latent, n_layers=opts.n_layers,
                     n_hidden=opts.n_hidden, **arch)
        info.update(train(model, opts, inp.progress))
        out[mask if inductive else slice(None)] = _output(model, ref, opts, ref_batch)
        if inductive:
            query = data[~mask].copy()
            SCVI.prepare_query_anndata(query, model)
            qmodel = SCVI.load_query_data(query, model)
            info.update(train(qmodel, opts, inp.progress, prefix="query_", weight_decay=0.0))
            out[~mask] = _output(qmodel, query, opts, ref_batch)
            info["heldout_mapping"] = "scarches"
    info["converged"] = not (info["stopped_on_cap"] or info.get("query_stopped_on_cap", False))
    names_out = ([f"scvi_{i + 1}" for i in range(out.shape[1])] if opts.output == "latent"
                 else [str(g) for g in data.var_names])
    return MethodOutput(X=out, feature_names=names_out, info=info)


SPEC = register(MethodSpec(
    name="scvi",
    summary="scVI (scvi-tools) latent or batch-corrected expression",
    run=run,
    options=ScviOptions,
    needs_batches=True,
    heldout="inductive: held-out donors mapped as new batches with scArches "
            "(load_query_data); transductive: one model over every donor",
    output=lambda opts: "features" if opts.output == "latent" else "expression",
    protocols=("inductive", "transductive"),
    check_input=check_integer_counts,
    version=2,  # v2: scvi-tools' epoch rule + early stopping on held-out ELBO
))
