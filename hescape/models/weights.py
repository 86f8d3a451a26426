"""Reading weight files safely and offline.

Tensors only: safetensors files, or ``.pt/.pth/.bin`` through ``torch.load(weights_only=True)``;
a pickle that would construct arbitrary objects (run code) is refused. Hub weights are only
looked up in an already-populated HF cache (``try_to_load_from_cache``), never downloaded.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class UnsafeCheckpointError(ValueError):
    """A checkpoint that carries code/objects beyond tensors and plain data."""


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with a clear error for unsafe pickles."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds pickled objects beyond tensors and plain data "
            f"(it could run code). Re-save it as a state_dict (safetensors preferred). Detail: {exc}"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensor state dict from a safetensors or torch file (nested ``state_dict``/``model`` unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = safe_torch_load(path)
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def cached_hub_file(repo_id: str) -> Path | None:
    """A weights file of ``repo_id`` already in the local HF cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def hf_cache_dir() -> str:
    """Where the HF hub cache lives on this machine (for error messages)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def file_fingerprint(path: str | Path) -> str:
    """Cheap identity of a (possibly multi-GB) file: size, mtime and a hash of its first MiB."""
    path = Path(path)
    stat = path.stat()
    with path.open("rb") as fh:
        head = hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{head}"


def state_fingerprint(state: dict[str, Tensor]) -> str:
    """Hash of a state dict's tensors (identity of random-init weights)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]
