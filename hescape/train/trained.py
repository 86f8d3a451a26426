"""A trained two-tower model: its checkpoint, what it was trained on, and the one way to
embed data with it.

``TrainedModel`` owns what every consumer of a trained checkpoint needs (scvi-tools keeps the
same split between a trained model object and its network):

- loading: the network (eval mode, CPU), its ``StudyConfig`` and ``meta.json``;
- checking: a dataset's prepared expression must yield the checkpoint's feature names; cached
  frozen-backbone features are used only for the dataset they were computed on (same
  fingerprint, one row per obs, the backbone's width) and only when the backbone did not
  train; a features file given explicitly that fails those checks is an error, not a
  silent re-encode;
- inputs: the prepared expression (given, e.g. by the study's precomputed variant, else from
  the preprocessing cache), the backbone features (given, else the training run's cache when
  it applies) or the patches with the fitted stain normaliser;
- embedding any rows of a dataset (``embed``) and the frozen-encoder baseline features
  (``frozen_features``: the backbone before contrastive training).

Evaluation (``hescape.evaluate.checkpoint_eval``), ``embed.embed_split``, ``hescape evaluate``
and the study's trials all go through it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hescape.config import StudyConfig
from hescape.train.device import Compute
from hescape.train.embed import compute_embeddings


@dataclass(frozen=True)
class ModelInputs:
    """Row-aligned inputs of one dataset for one trained model.

    ``gene_x``: prepared expression (obs order), None for image-only data; ``features``:
    cached backbone features (obs order, memmapped) or None, then ``patches`` are encoded
    (with ``stain``, the fitted normaliser, when the config normalises stain);
    ``feature_source``: where the image side comes from, for logs and tests.
    """

    gene_x: np.ndarray | None
    features: np.ndarray | None
    patches: Any
    stain: Any
    feature_source: str

    def image_source(self) -> dict[str, Any]:
        """Keyword arguments of ``compute_embeddings`` for the image side."""
        if self.features is not None:
            return {"features": self.features}
        return {"images": self.patches, "stain": self.stain}


@dataclass(frozen=True)
class Embeddings:
    """Unit-norm float32 embeddings of ``rows`` (obs indices); ``gene`` None without
    expression."""

    img: np.ndarray
    gene: np.ndarray | None
    rows: np.ndarray


class TrainedModel:
    """A checkpoint's model, config and meta (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cfg: StudyConfig, meta: dict[str, Any],
                 path: Path) -> None:
        self.model, self.cfg, self.meta, self.path = model, cfg, meta, Path(path)

    @classmethod
    def load(cls, ckpt_dir: str | Path) -> TrainedModel:
        """The checkpoint directory's model (eval mode, CPU), config and meta."""
        from hescape.train.checkpoint import load_model

        model, cfg, meta = load_model(ckpt_dir)
        return cls(model, cfg, meta, Path(ckpt_dir))

    # ------------------------------------------------------------------ what it was
    @property
    def image_frozen(self) -> bool:
        return bool(getattr(self.model, "image_frozen", False))

    @property
    def feature_names(self) -> list[str] | None:
        names = self.meta.get("feature_names")
        return None if names is None else [str(n) for n in names]

    @property
    def backbone_dim(self) -> int:
        return int(self.model.image_encoder.out_dim)

    def trained_on(self, paired: Any) -> bool:
        """True when ``paired`` is the dataset this model was trained on (fingerprint)."""
        return self.meta.get("fingerprint") == paired.fingerprint

    # ------------------------------------------------------------------ inputs
    def prepared_expression(self, paired: Any, prepared: Any = None, *,
                            progress: bool = False) -> np.ndarray | None:
        """The model's gene input for ``paired``: ``prepared`` (a ``PreparedExpression``, e.g.
        the study's precomputed variant) or the preprocessing cache's entry for this
        checkpoint's variant; None for image-only data. ValueError when its features are not
        the checkpoint's (another gene panel or preprocessing)."""
        if not paired.manifest.get("has_expression", True) or paired.adata.n_vars == 0:
            return None
        if prepared is None:
            from hescape.train.inputs import prepare_expression

            prepared = prepare_expression(self.cfg, paired, progress=progress)
        want = self.feature_names
        if want is not None and list(prepared.feature_names) != want:
            raise ValueError(
                f"{self.path}: the dataset's prepared expression has {len(prepared.feature_names)} "
                f"features, the checkpoint {len(want)} (or other names): a different gene panel "
                "or preprocessing than the model was trained with")
        if prepared.X.shape[0] != paired.adata.n_obs:
            raise ValueError(f"prepared expression has {prepared.X.shape[0]} rows for a dataset "
                             f"of {paired.adata.n_obs} obs (prepared for another dataset?)")
        return prepared.X

    def cached_features(self, paired: Any, features: str | Path | np.ndarray | None = None,
                        ) -> tuple[np.ndarray | None, str]:
        """(backbone features of ``paired``, where from) or (None, why not).

        ``features`` given (a path or an array): it must fit (frozen backbone, this model's
        dataset, n_obs x backbone width), else ValueError. Not given: the training run's
        cache (``meta.features_path``) when it fits, else None (patches get encoded)."""
        explicit = features is not None
        source = features if explicit else self.meta.get("features_path")
        if source is None:
            return None, "no feature cache"
        if not self.image_frozen:
            if explicit:
                raise ValueError(f"{self.path}: the image backbone trained, so cached "
                                 "frozen-backbone features cannot stand in for it")
            return None, "backbone trained"
        if not self.trained_on(paired):
            if explicit:
                raise ValueError(f"features given for {paired.path}, but the checkpoint was "
                                 f"trained on another dataset (fingerprint "
                                 f"{self.meta.get('fingerprint')} vs {paired.fingerprint})")
            return None, "another dataset"
        if isinstance(source, np.ndarray):
            feats, name = source, "array"
        else:
            if not Path(source).is_file():
                if explicit:
                    raise FileNotFoundError(f"{source}: feature cache missing")
                return None, f"{source} missing"
            feats, name = np.load(source, mmap_mode="r"), str(source)
        want = (paired.adata.n_obs, self.backbone_dim)
        if feats.ndim != 2 or tuple(feats.shape) != want:
            if explicit:
                raise ValueError(f"{name}: features of shape {tuple(feats.shape)}, expected "
                                 f"{want} (n_obs x backbone width); delete the file to recompute")
            return None, f"{name} has shape {tuple(feats.shape)}"
        return feats, f"cache:{name}"

    def inputs(self, paired: Any, *, prepared: Any = None,
               features: str | Path | np.ndarray | None = None,
               progress: bool = False) -> ModelInputs:
        """Everything ``embed`` reads for ``paired`` (see ``prepared_expression`` and
        ``cached_features``); the stain normaliser is fitted only when patches get encoded."""
        from hescape.train.inputs import fit_stain

        gene_x = self.prepared_expression(paired, prepared, progress=progress)
        feats, source = self.cached_features(paired, features)
        stain = None if feats is not None else fit_stain(self.cfg, paired)
        return ModelInputs(gene_x=gene_x, features=feats, patches=paired.patches, stain=stain,
                           feature_source=source if feats is not None else "patches")

    # ------------------------------------------------------------------ embedding
    def compute(self, device: str | torch.device = "cpu") -> Compute:
        """The training's precision rule (``train.precision``, channels_last) on ``device``."""
        return Compute.of(self.cfg.train, device)

    def embed(self, inputs: ModelInputs, rows: np.ndarray, *,
              device: str | torch.device = "cpu", batch_size: int = 256,
              progress: bool = False) -> Embeddings:
        """Embeddings of ``rows`` (obs indices) from ``inputs`` (the one embedding loop)."""
        rows = np.asarray(rows)
        emb = compute_embeddings(self.model, compute=self.compute(device), gene_x=inputs.gene_x,
                                 rows=rows, batch_size=batch_size, progress=progress,
                                 **inputs.image_source())
        return Embeddings(img=emb["img"], gene=emb["gene"], rows=rows)

    def frozen_features(self, inputs: ModelInputs, rows: np.ndarray, *,
                        device: str | torch.device = "cpu", batch_size: int = 256,
                        progress: bool = False) -> np.ndarray | None:
        """Features of the image encoder before contrastive training on ``rows``: the cached
        ones when the backbone was frozen (they are exactly that), else encoded with the
        encoder built as configured (its pretrained weights, or the fixed-seed random init);
        None (warned) when it cannot be built."""
        if inputs.features is not None:
            return np.asarray(inputs.features[np.asarray(rows)], dtype=np.float32)
        from hescape.train.features import encode_patches, frozen_image_encoder

        try:
            encoder = frozen_image_encoder(self.cfg)
        except (OSError, ValueError, RuntimeError) as exc:
            warnings.warn(f"frozen-image baseline skipped: {exc}", UserWarning, stacklevel=2)
            return None
        return encode_patches(encoder, inputs.patches, rows=np.asarray(rows),
                              compute=self.compute(device), batch_size=batch_size,
                              stain=inputs.stain, progress=progress)


def embed_split(
    ckpt_dir: str | Path, paired: Any, part: str, *, batch_size: int = 256,
    device: str = "cpu", progress: bool = False,
) -> dict[str, np.ndarray]:
    """Embed the ``part`` ("train"/"val"/"test") of ``paired`` with a checkpoint's model:
    ``dict(img, gene, index)`` (``index``: obs rows). Same checks and inputs as every other
    use of a trained model (``TrainedModel.inputs``)."""
    trained = TrainedModel.load(ckpt_dir)
    inputs = trained.inputs(paired, progress=progress)
    emb = trained.embed(inputs, paired.indices(part), device=device, batch_size=batch_size,
                        progress=progress)
    return {"img": emb.img, "gene": emb.gene, "index": emb.rows}
