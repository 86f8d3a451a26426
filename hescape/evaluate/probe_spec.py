"""The probe registry: what every evaluation probe needs and which metric names it emits.

A probe is one function registered with ``@register_probe(...)`` (see ``suite.py``); the
evaluation pipeline loops ``probe_specs()``, the baselines' comparison table, the CLI summary
and the study report read names from here. Two scopes:

- ``"features"``: ``run(feats, data)`` on one feature matrix (rows in obs order); it runs on
  every feature set (trained ``img`` / ``gene`` / ``joint`` embeddings, ``baseline_*``
  features) and its keys are ``{split}/{features}/{metric}``.
- ``"pair"``: ``run(data)`` on the two towers together (retrieval, BLEEP); keys are
  ``{split}/{metric}``.

One key rule, so ``parse_key`` needs no special cases: 2 ``/``-parts = pair metric, 3 = a
feature-set metric. Numpy / pandas / sklearn only (no torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from hescape.config import EvalConfig
from hescape.registry import Registry

OBS_ROLES = ("donor", "batch", "label", "mutation")
PER_DONOR_COLUMNS = ["metric", "donor", "value", "n"]


@dataclass(kw_only=True)
class EvalData:
    """Everything an evaluation reads: embeddings, rows, expression, obs, config.

    Rows are in obs order; ``train_idx`` fits probes, ``test_idx`` is scored. ``expr_log``:
    library-size-normalised log1p expression (N x G); ``counts``: raw counts (N x G, dense or
    scipy sparse; HEST targets are their log1p); both None for image-only data.
    ``baselines``: image-feature baselines ``{name: N x F}`` (``frozen`` = the image encoder
    before contrastive training). ``img`` is None only in a baselines-only evaluation (the
    study evaluates its baselines once, ``evaluate_baselines``).
    """

    obs: pd.DataFrame
    train_idx: np.ndarray
    test_idx: np.ndarray
    cfg: EvalConfig
    img: np.ndarray | None = None
    gene: np.ndarray | None = None
    expr_log: np.ndarray | None = None
    counts: Any = None
    gene_names: list[str] | None = None
    label_key: str | None = None
    mutation_key: str | None = None
    batch_key: str = "donor"
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    pca_baseline: bool = True  # with cfg.baselines and expression: the baseline_pca feature set

    def __post_init__(self) -> None:
        n = len(self.obs)
        if self.img is None and self.gene is not None:
            raise ValueError("gene embedding without img: pass both towers (img is None only "
                             "in a baselines-only evaluation)")
        if self.img is not None and len(self.img) != n:
            raise ValueError(f"obs has {n} rows but img has {len(self.img)} (rows in obs order)")
        self.obs = self.obs.reset_index(drop=True)
        self.train_idx = _as_index(self.train_idx, n, "train_idx")
        self.test_idx = _as_index(self.test_idx, n, "test_idx")
        if self.gene is not None and np.shape(self.gene) != np.shape(self.img):
            raise ValueError(f"gene embedding shape {np.shape(self.gene)} != img shape "
                             f"{np.shape(self.img)}")  # fmt: skip
        for col in {"donor", self.batch_key}:
            if col not in self.obs.columns:
                raise ValueError(f"obs lacks column {col!r}; columns: {list(self.obs.columns)}")
        if self.expr_log is not None:
            self.expr_log = np.asarray(self.expr_log, dtype=np.float32)
        if self.gene_names is not None:
            self.gene_names = [str(g) for g in self.gene_names]
        _check_expression(self, n)
        for name, feats in self.baselines.items():
            if len(feats) != n:
                raise ValueError(f"baseline {name!r}: {len(feats)} rows, expected {n} (obs order)")

    def key_of(self, role: str) -> str | None:
        """The obs column behind a role (``donor``, ``batch``, ``label``, ``mutation``)."""
        return {"donor": "donor", "batch": self.batch_key, "label": self.label_key,
                "mutation": self.mutation_key}[role]  # fmt: skip

    def has(self, role: str) -> bool:
        key = self.key_of(role)
        return key is not None and key in self.obs.columns

    def column(self, key: str | None, rows: np.ndarray) -> np.ndarray | None:
        """Values of an obs column on ``rows``, or None when the key is unset or absent."""
        if key is None or key not in self.obs.columns:
            return None
        return self.obs[key].to_numpy()[rows]

    def donors(self, rows: np.ndarray) -> np.ndarray:
        return self.obs["donor"].to_numpy()[rows]

    @property
    def has_expression(self) -> bool:
        return self.expr_log is not None

    @property
    def group_key(self) -> str:
        """Mutation-probe aggregation unit: slide when recorded, else donor."""
        return "slide" if "slide" in self.obs.columns else "donor"


def _as_index(rows: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"{name}: boolean mask of length {arr.shape} for {n} rows")
        return np.flatnonzero(arr)
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name}: indices outside 0..{n - 1}")
    return arr


def _check_expression(data: EvalData, n: int) -> None:
    g = None if data.gene_names is None else len(data.gene_names)
    for name in ("expr_log", "counts"):
        value = getattr(data, name)
        if value is not None and (g is None or tuple(value.shape) != (n, g)):
            raise ValueError(f"{name} {tuple(value.shape)} must be N x G with N = {n} and "
                             f"G = len(gene_names) = {g}")  # fmt: skip
    if data.counts is not None and data.expr_log is None:
        raise ValueError("counts given without expr_log: pass both (or neither for image-only)")


@dataclass
class ProbeResult:
    """What one probe run returns: metrics (unprefixed names), a per-donor table
    (``PER_DONOR_COLUMNS``, unprefixed metric names), per-gene tables, a note (why a figure
    is NaN / was skipped) and retrieval ranks (for plots)."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_donor: pd.DataFrame | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    note: str | None = None
    ranks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ProbeSpec:
    """One registered probe.

    ``metrics``: emitted names; templates may hold ``{k}`` (each of ``eval.ks``), ``{dir}``
    (``img2gene``/``gene2img``), ``{B}`` (in-batch size), ``{G}`` (``eval.fixed_gallery``).
    ``obs``: roles it needs (skipped when a role's column is unset/absent).
    ``needs_expression``: skipped on image-only data. ``predicts_expression``: skipped on
    feature sets computed from expression (gene / joint embeddings, PCA of expression).
    ``tasks``: comparison-table rows ``{label: metric}``; ``headline``: metrics for summaries.
    """

    name: str
    run: Callable[..., ProbeResult]
    scope: Literal["features", "pair"]
    metrics: tuple[str, ...]
    obs: tuple[str, ...] = ()
    needs_expression: bool = False
    predicts_expression: bool = False
    tasks: Mapping[str, str] = field(default_factory=dict)
    headline: tuple[str, ...] = ()

    def applies(self, data: EvalData, *, from_expression: bool = False) -> bool:
        """Whether this probe runs on ``data`` (and on a feature set of that origin)."""
        if self.needs_expression and not data.has_expression:
            return False
        if self.predicts_expression and from_expression:
            return False
        if self.scope == "pair" and (data.img is None or data.gene is None
                                     or len(data.test_idx) < 2):
            return False
        return all(data.has(role) for role in self.obs)


PROBES: Registry[ProbeSpec] = Registry("probe")


def register_probe(
    *,
    name: str,
    scope: Literal["features", "pair"] = "features",
    metrics: tuple[str, ...],
    obs: tuple[str, ...] = (),
    needs_expression: bool = False,
    predicts_expression: bool = False,
    tasks: Mapping[str, str] | None = None,
    headline: tuple[str, ...] = (),
) -> Callable[[Callable[..., ProbeResult]], Callable[..., ProbeResult]]:
    """Decorator: register ``run`` as probe ``name`` (``PROBES.get(name)`` gives its spec)."""
    unknown = set(obs) - set(OBS_ROLES)
    if unknown:
        raise ValueError(f"probe {name!r}: unknown obs roles {sorted(unknown)}; use {OBS_ROLES}")
    patterns = [metric_pattern(t) for t in metrics]
    sample = {"{k}": "1", "{dir}": "img2gene", "{B}": "2", "{G}": "2"}
    named = [*(tasks or {}).values(), *headline]
    undeclared = [n for n in named
                  if not any(p.match(_fill(n, sample)) for p in patterns)]  # fmt: skip
    if undeclared:
        raise ValueError(f"probe {name!r}: tasks/headline name undeclared metrics {undeclared}")

    def deco(run: Callable[..., ProbeResult]) -> Callable[..., ProbeResult]:
        spec = ProbeSpec(name=name, run=run, scope=scope, metrics=tuple(metrics), obs=tuple(obs),
                         needs_expression=needs_expression,
                         predicts_expression=predicts_expression, tasks=dict(tasks or {}),
                         headline=tuple(headline))  # fmt: skip
        PROBES.add(spec)
        return run

    return deco


def probe_specs() -> list[ProbeSpec]:
    """Every registered probe, pair probes first, then by name (importing ``suite``
    registers the built-in ones)."""
    import hescape.evaluate.suite  # noqa: F401 - registers the probes

    specs = PROBES.entries()
    return sorted(specs, key=lambda s: (s.scope != "pair", s.name))


# --------------------------------------------------------------------------- keys
def metric_key(split: str, metric: str, features: str | None = None) -> str:
    """``{split}/{metric}`` (pair probe) or ``{split}/{features}/{metric}``."""
    return f"{split}/{metric}" if features is None else f"{split}/{features}/{metric}"


def parse_key(key: str) -> tuple[str, str | None, str]:
    """Inverse of ``metric_key``: ``(split, features or None, metric)``."""
    parts = key.split("/")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"{key!r} is not an evaluation key ({{split}}/[{{features}}/]{{metric}})")


_FIELDS = {"k": r"\d+", "dir": "(?:img2gene|gene2img)", "B": r"\d+", "G": r"\d+"}


def metric_pattern(template: str) -> re.Pattern:
    """Regex matching every expansion of a metric-name template."""
    out = re.escape(template)
    for name, rx in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), rx)
    return re.compile(f"^{out}$")


def _fill(template: str, values: dict[str, str]) -> str:
    for token, value in values.items():
        template = template.replace(token, value)
    return template


def expand(template: str, cfg: EvalConfig) -> list[str]:
    """Names of a template under ``cfg`` (in-batch size as configured)."""
    names = [template]
    values = {"k": [str(k) for k in sorted(set(cfg.ks))], "dir": ["img2gene", "gene2img"],
              "B": [str(cfg.inbatch_size)], "G": [str(cfg.fixed_gallery)]}  # fmt: skip
    for name, vals in values.items():
        token = "{" + name + "}"
        names = [n.replace(token, v) for n in names for v in (vals if token in n else [token])]
    return names


def metric_names(cfg: EvalConfig | None = None) -> dict[str, list[str]]:
    """``{probe: [metric names]}`` with templates expanded under ``cfg`` (default config)."""
    cfg = cfg or EvalConfig()
    return {s.name: [n for t in s.metrics for n in expand(t, cfg)] for s in probe_specs()}


def comparison_tasks() -> dict[str, str]:
    """Comparison-table rows ``{label: metric}`` of every feature-set probe."""
    return {label: m for s in probe_specs() if s.scope == "features" for label, m in s.tasks.items()}


def headline_keys(split: str = "test", cfg: EvalConfig | None = None) -> list[str]:
    """Summary keys: pair headlines, feature headlines on ``img`` (and on ``gene`` for
    probes that do not predict expression)."""
    cfg = cfg or EvalConfig()
    keys: list[str] = []
    for s in probe_specs():
        names = [n for t in s.headline for n in expand(t, cfg)]
        if s.scope == "pair":
            keys += [metric_key(split, n) for n in names]
            continue
        sets = ["img"] if s.predicts_expression else ["img", "gene"]
        keys += [metric_key(split, n, fs) for fs in sets for n in names]
    return keys
