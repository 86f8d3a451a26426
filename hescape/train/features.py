"""Frozen-encoder feature cache: encode every patch once, share the result across trials.

Key: (``encoder.feature_key()`` - architecture, weights, input size, normalisation -,
dataset fingerprint, stain normalisation [+ training donors when the normaliser is fitted
on them], ``train.feature_dtype`` when not float32). File:
``<storage_dir>/cache/features/<key>.npy`` (float32 or float16, N x D, obs order; every
reader converts rows to float32)
plus ``<key>.json`` (provenance). Written to a temp file and renamed under a ``filelock``,
so two processes asking at once compute once.

Stain *augmentation* (HED jitter) changes the input every step, so it cannot use cached
features: with ``preprocess.image.stain_augment > 0`` training re-encodes each batch
(``use_feature_cache`` returns False and the loop logs why). A random-init frozen encoder
is built from a fixed seed (``frozen_image_encoder``), so the cache and the trained model
hold the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hescape.config import StudyConfig
from hescape.data.rowio import NpyRowWriter, read_rows
from hescape.train.dataset import images_to_input

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
                      train_donors: list[str] | None = None, dtype: str = "float32") -> str:
    """Cache key of the features of ``encoder`` on a dataset (content ``fingerprint``),
    stored as ``dtype``."""
    spec = {"encoder": encoder.feature_key(), "data": fingerprint, "stain_norm": stain_norm,
            "stain_ref": sorted(train_donors) if stain_norm != "none" and train_donors else None}
    if dtype != "float32":  # float32 keys stay what they were before the option existed
        spec["dtype"] = dtype
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{encoder.feature_key()}-{digest}"


def feature_cache_path(storage_dir: str | Path, key: str) -> Path:
    """``<storage_dir>/cache/features/<key>.npy``."""
    return Path(storage_dir).resolve() / "cache" / "features" / f"{key}.npy"


@torch.no_grad()
def encode_patches(
    encoder: Any, patches: np.ndarray, *, batch_size: int = 256, device: str = "cpu",
    stain: Any = None, progress: bool = True, out: Any = None,
) -> Any:
    """Features (float32, N x D) of uint8 ``patches`` with the frozen ``encoder``.

    ``out``: where the rows go (anything taking ``out[a:b] = block``, e.g. an
    ``NpyRowWriter``); a new array when None. A memmapped patch store is read block by
    block through its file (``read_rows``), so memory stays one batch whatever N.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    encoder = encoder.to(dev).eval()
    use_bf16 = dev.type == "cuda"
    if out is None:
        out = np.empty((len(patches), encoder.out_dim), dtype=np.float32)
    for start in tqdm(range(0, len(patches), batch_size), desc="image features",
                      disable=not progress, unit="batch"):
        block = read_rows(patches, start, start + batch_size)
        x = images_to_input(block, encoder, stain=stain).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            feats = encoder(x)
        out[start:start + len(x)] = feats.float().cpu().numpy()
    return out


def cached_features(
    cfg: StudyConfig, paired: Any, *, encoder: Any = None, stain: Any = None,
    device: str = "cpu", batch_size: int = 256, progress: bool = True,
) -> Path:
    """Path of the cached features for (``cfg``'s frozen encoder, ``paired``): compute once.

    ``stain`` is the fitted Macenko normaliser when ``preprocess.image.stain_norm`` is set.
    """
    from filelock import FileLock

    encoder = encoder if encoder is not None else frozen_image_encoder(cfg)
    stain_norm = cfg.preprocess.image.stain_norm
    dtype = cfg.train.feature_dtype
    key = feature_cache_key(encoder, paired.fingerprint, stain_norm, paired.split.get("train"),
                            dtype)
    path = feature_cache_path(cfg.storage_dir, key)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another process finished while we waited
            return path
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}.npy")
        shape = (len(paired.patches), int(encoder.out_dim))
        try:  # streamed to the file: memory stays one batch whatever the number of patches
            with NpyRowWriter(tmp, shape, dtype) as rows:
                encode_patches(encoder, paired.patches, batch_size=batch_size, device=device,
                               stain=stain, progress=progress, out=rows)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        meta = {"feature_key": encoder.feature_key(), "fingerprint": paired.fingerprint,
                "stain_norm": stain_norm, "shape": list(shape), "dtype": dtype}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)
    return path


def load_features(path: str | Path, n_obs: int) -> np.ndarray:
    """Memory-map cached features and check they cover ``n_obs`` rows."""
    feats = np.load(path, mmap_mode="r")
    if feats.ndim != 2 or feats.shape[0] != n_obs:
        raise ValueError(f"{path}: features of shape {feats.shape} do not match {n_obs} obs; "
                         "delete the file to recompute it")
    return feats
