"""Frozen-encoder feature cache: encode every patch once, share the result across trials.

Key: (``encoder.feature_key()`` - architecture, weights, input size, normalisation -,
dataset fingerprint, stain normalisation [+ training donors when the normaliser is fitted
on them], ``train.feature_dtype`` when not float32, the autocast precision when not
float32: ``bfloat16`` where the training autocasts by ``train.precision``'s rule,
``hescape.train.device``). File: ``paths.cache_dir(storage_dir, "features")/<key>.npy``
(float32 or float16, N x D, obs order; every reader converts rows to float32) plus
``<key>.json`` (provenance). Encoded by the one embedding loop (``train.embed``) into a
temp file renamed into place (``hescape.atomic``) under a ``filelock``, so two processes
asking at once compute once.

Stain *augmentation* (HED jitter) changes the input every step, so it cannot use cached
features: with ``preprocess.image.stain_augment > 0`` training re-encodes each batch
(``use_feature_cache`` returns False and the loop logs why). A random-init frozen encoder
is built from a fixed seed (``frozen_image_encoder``), so the cache and the trained model
hold the same weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hescape.atomic import atomic_path, write_json
from hescape.config import StudyConfig
from hescape.data.rowio import NpyRowWriter
from hescape.paths import cache_dir
from hescape.train.device import Compute
from hescape.train.embed import CPU, RowInputs, forward_batches

FROZEN_INIT_SEED = 0


def use_feature_cache(cfg: StudyConfig) -> bool:
    """True when training reads cached image features instead of re-encoding patches."""
    return (cfg.model.image.mode == "frozen" and cfg.train.feature_cache
            and cfg.preprocess.image.stain_augment == 0)


def frozen_image_encoder(cfg: StudyConfig) -> torch.nn.Module:
    """The image encoder, built from a fixed seed (identical weights in every process)."""
    from hescape.models import create_image_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FROZEN_INIT_SEED)
        return create_image_encoder(cfg.model.image)


def feature_cache_key(encoder: Any, fingerprint: str, stain_norm: str,
                      train_donors: list[str] | None = None, dtype: str = "float32",
                      precision: str = "float32") -> str:
    """Cache key of the features of ``encoder`` on a dataset (content ``fingerprint``),
    computed at ``precision`` (``Compute.precision``) and stored as ``dtype``."""
    spec = {"encoder": encoder.feature_key(), "data": fingerprint, "stain_norm": stain_norm,
            "stain_ref": sorted(train_donors) if stain_norm != "none" and train_donors else None}
    # float32 keys stay what they were before these options existed
    if dtype != "float32":
        spec["dtype"] = dtype
    if precision != "float32":
        spec["precision"] = precision
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{encoder.feature_key()}-{digest}"


def feature_lookup_key(cfg: StudyConfig) -> str:
    """What decides which feature-cache entry a config reads, from the config alone (no
    encoder built): the image section, stain normalisation, stored dtype, precision rule and
    device. The driver files each precomputed cache path under it (``SharedContext``), so a
    trial finds its features without rebuilding the encoder to compute the cache key."""
    spec = {"image": cfg.model.image.model_dump(mode="json"),
            "stain_norm": cfg.preprocess.image.stain_norm, "dtype": cfg.train.feature_dtype,
            "precision": cfg.train.precision, "use_gpu": cfg.train.use_gpu}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def feature_cache_path(storage_dir: str | Path, key: str) -> Path:
    """``<storage_dir>/cache/features/<key>.npy`` (``~`` expanded)."""
    return cache_dir(storage_dir, "features") / f"{key}.npy"


def encode_patches(encoder: Any, patches: Any, *, compute: Compute = CPU,
                   rows: np.ndarray | None = None, batch_size: int = 256, stain: Any = None,
                   progress: bool = True, out: Any = None) -> Any:
    """Features (float32, N x D) of uint8 ``patches`` (or of its ``rows``) with ``encoder``.

    ``out``: where the rows go (anything taking ``out[a:b] = block``, e.g. an
    ``NpyRowWriter``); a new array when None.
    """
    net = compute.place(encoder.eval())
    inputs = RowInputs(compute=compute, images=patches, rows=rows, encoder=net, stain=stain)
    if out is None:
        out = np.empty((len(inputs), net.out_dim), dtype=np.float32)
    start = 0
    for feats in forward_batches(lambda b: net(b["image"]), inputs, batch_size=batch_size,
                                 progress=progress, desc="image features"):
        out[start:start + len(feats)] = feats.float().cpu().numpy()
        start += len(feats)
    return out


def cached_features(
    cfg: StudyConfig, paired: Any, *, encoder: Any = None, stain: Any = None,
    device: torch.device | str = "cpu", batch_size: int = 256, progress: bool = True,
) -> Path:
    """Path of the cached features for (``cfg``'s frozen encoder, ``paired``): compute once.

    ``stain`` is the fitted Macenko normaliser when ``preprocess.image.stain_norm`` is set.
    """
    from filelock import FileLock

    encoder = encoder if encoder is not None else frozen_image_encoder(cfg)
    # autocast as the training has it on its own device (a GPU when train.use_gpu): the
    # driver, a GPU task and a trial process without a GPU compute, and look up, one entry
    compute = Compute.as_trained(cfg.train, device)
    stain_norm = cfg.preprocess.image.stain_norm
    dtype = cfg.train.feature_dtype
    key = feature_cache_key(encoder, paired.fingerprint, stain_norm, paired.split.get("train"),
                            dtype, compute.precision)
    path = feature_cache_path(cfg.storage_dir, key)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another process finished while we waited
            return path
        shape = (len(paired.patches), int(encoder.out_dim))
        # streamed to the file: memory stays one batch whatever the number of patches; the
        # .npy appears (renamed) only once complete, after its provenance .json
        with atomic_path(path) as tmp:
            with NpyRowWriter(tmp, shape, dtype) as rows:
                encode_patches(encoder, paired.patches, compute=compute, batch_size=batch_size,
                               stain=stain, progress=progress, out=rows)
            write_json(path.with_suffix(".json"), {
                "feature_key": encoder.feature_key(), "fingerprint": paired.fingerprint,
                "stain_norm": stain_norm, "shape": list(shape), "dtype": dtype,
                "precision": compute.precision})
    return path


def load_features(path: str | Path, n_obs: int) -> np.ndarray:
    """Memory-map cached features and check they cover ``n_obs`` rows."""
    feats = np.load(path, mmap_mode="r")
    if feats.ndim != 2 or feats.shape[0] != n_obs:
        raise ValueError(f"{path}: features of shape {feats.shape} do not match {n_obs} obs; "
                         "delete the file to recompute it")
    return feats
