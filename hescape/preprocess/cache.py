"""Content-addressed cache of preprocessed expression, shared by every trial and study.

One entry per (dataset fingerprint, the variant's own options, split, batch key): a
``<name>.npz`` (X) and a ``<name>.json`` (everything else), each written atomically
(``hescape.atomic``), the json last (it is the commit marker). A ``filelock``
around the computation makes concurrent callers (Ray trials, two studies) compute once:
the second waits, then reads what the first wrote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hescape import atomic
from hescape.preprocess.expression import PreparedExpression, apply_expression_variant
from hescape.preprocess.spec import get_method, options_of

if TYPE_CHECKING:
    from hescape.config import ExpressionPreprocess

CACHE_VERSION = 2


def variant_options(cfg: ExpressionPreprocess) -> dict[str, Any]:
    """What determines ``cfg.method``'s output: the method, its spec version, the gene
    selection and the method's own options section (other methods' sections do not split
    the cache). Derived from the method's options model: no key list to keep in sync."""
    spec = get_method(cfg.method)
    opts = options_of(cfg)
    return {"method": spec.name, "version": spec.version, "n_top_genes": cfg.n_top_genes,
            "options": None if opts is None else opts.model_dump(mode="json")}


def variant_key(fingerprint: str, cfg: ExpressionPreprocess, split: dict[str, list[str]], *,
                batch_key: str) -> str:
    """Stable hex key of (fingerprint, variant options, split, batch key)."""
    payload = {"version": CACHE_VERSION, "fingerprint": fingerprint,
               "options": variant_options(cfg), "batch_key": batch_key,
               "split": {part: sorted(map(str, donors)) for part, donors in sorted(split.items())}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def prepare(paired: Any, cfg: ExpressionPreprocess, *, batch_key: str, cache_dir: str | Path,
            progress: bool = True) -> PreparedExpression:
    """Preprocessed expression of ``paired`` (a ``PairedData``), computed once and cached.

    Training rows are those whose donor is in ``paired.split["train"]``.
    """
    from filelock import FileLock

    key = variant_key(paired.fingerprint, cfg, paired.split, batch_key=batch_key)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = cache_dir / f"expr-{cfg.method}-{key}"
    hit = load_entry(base)
    if hit is not None:
        return hit
    with FileLock(str(base) + ".lock"):
        hit = load_entry(base)  # another process may have finished while we waited
        if hit is not None:
            return hit
        train_mask = np.asarray(paired.part_of()) == "train"
        out = apply_expression_variant(paired.adata, cfg, batch_key=batch_key,
                                       train_mask=train_mask, progress=progress)
        out.cache_key = key
        out.info["options"] = variant_options(cfg)
        save_entry(base, out)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_entry(base: Path, prepared: PreparedExpression) -> None:
    """Write ``base``.npz then ``base``.json, each atomically."""
    meta = {"feature_names": list(prepared.feature_names), "saw_heldout": prepared.saw_heldout,
            "method": prepared.method, "kind": prepared.kind, "info": prepared.info,
            "cache_key": prepared.cache_key, "shape": list(prepared.X.shape),
            "version": CACHE_VERSION}
    atomic.write_with(base.with_suffix(".npz"), lambda fh: np.savez(fh, X=prepared.X))
    atomic.write_json(base.with_suffix(".json"), meta, default=_jsonable)  # the commit marker


def load_entry(base: Path) -> PreparedExpression | None:
    """The cached entry at ``base``, or None if absent (or unreadable: it is recomputed)."""
    meta_path, x_path = base.with_suffix(".json"), base.with_suffix(".npz")
    if not (meta_path.is_file() and x_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(x_path) as data:
            x = np.asarray(data["X"], dtype=np.float32)
    except (OSError, ValueError, KeyError):
        return None
    if list(x.shape) != meta.get("shape") or meta.get("version") != CACHE_VERSION:
        return None
    return PreparedExpression(X=x, feature_names=meta["feature_names"],
                              saw_heldout=bool(meta["saw_heldout"]), method=meta["method"],
                              info=meta["info"], cache_key=meta["cache_key"], kind=meta["kind"])
