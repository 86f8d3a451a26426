"""Ranking a set of trials on several objectives: non-dominated sorting, then crowding distance.

Pure numpy, no Ray: the rule MO-ASHA (``hescape.study.moasha``) applies at each rung, and
what its report section explains. Values are *oriented* first (``orient``): every objective
becomes larger-is-better (a ``min`` objective is negated) and a missing value (NaN) becomes
``-inf``, the worst possible.

- ``dominates(a, b)``: ``a`` is at least as good as ``b`` on every objective and better on one.
- ``nondominated_fronts``: front 0 holds the points no other point dominates; front 1 those
  only front-0 points dominate; and so on (Deb et al. 2002's fast non-dominated sort gives
  the same fronts).
- ``crowding_distance``: NSGA-II's tie-break inside a front (Deb et al. 2002): per objective,
  the gap between a point's two neighbours along that objective over the objective's range
  in the front, summed; the extremes of each objective get ``inf``. A larger distance is a
  point in a sparser part of the front, promoted first, so a promoted set spreads along the
  front instead of crowding one end.
- ``ranking``: one total order: front, then larger crowding distance, then better on the
  first objective, the second, ..., then earlier arrival (input order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Mode = str  # "max" | "min"


def orient(values: Sequence[Sequence[float]] | np.ndarray, modes: Sequence[Mode]) -> np.ndarray:
    """``values`` (n x k) as larger-is-better floats: ``min`` columns negated, NaN -> -inf."""
    x = np.asarray(values, dtype=np.float64).reshape(-1, len(modes))
    bad = [m for m in modes if m not in ("max", "min")]
    if bad:
        raise ValueError(f"modes must be 'max' or 'min', got {bad}")
    sign = np.array([1.0 if m == "max" else -1.0 for m in modes])
    out = x * sign
    out[np.isnan(out)] = -np.inf
    return out


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Oriented ``a`` dominates oriented ``b``: >= everywhere, > somewhere."""
    return bool(np.all(a >= b) and np.any(a > b))


def dominance_matrix(points: np.ndarray) -> np.ndarray:
    """``D[i, j]``: point i dominates point j (oriented points, n x k)."""
    p = np.asarray(points, dtype=np.float64)
    ge = np.all(p[:, None, :] >= p[None, :, :], axis=2)
    gt = np.any(p[:, None, :] > p[None, :, :], axis=2)
    return ge & gt


def nondominated_fronts(points: np.ndarray) -> np.ndarray:
    """Front index of every point (0 = not dominated by any point), by peeling fronts."""
    dom = dominance_matrix(points)
    n = len(dom)
    front = np.full(n, -1)
    left = np.ones(n, dtype=bool)
    level = 0
    while left.any():
        current = left & ~dom[left].any(axis=0)  # no remaining point dominates it
        front[current] = level
        left &= ~current
        level += 1
    return front


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point of ONE front (oriented, m x k)."""
    p = np.asarray(points, dtype=np.float64)
    m, k = p.shape
    dist = np.zeros(m)
    if m <= 2:
        return np.full(m, np.inf)
    for j in range(k):
        order = np.argsort(p[:, j], kind="stable")
        lo, hi = p[order[0], j], p[order[-1], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        span = hi - lo
        if not np.isfinite(span) or span <= 0:
            continue  # one value (or a missing one): this objective separates nothing
        gaps = (p[order[2:], j] - p[order[:-2], j]) / span
        dist[order[1:-1]] += np.where(np.isfinite(gaps), gaps, 0.0)
    return dist


def ranking(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, front, crowding): ``order`` lists the point indices best first (see the module
    docstring for the rule); ``front`` and ``crowding`` per point."""
    p = np.asarray(points, dtype=np.float64)
    n = len(p)
    front = nondominated_fronts(p) if n else np.zeros(0, dtype=int)
    crowd = np.zeros(n)
    for f in np.unique(front):
        members = np.flatnonzero(front == f)
        crowd[members] = crowding_distance(p[members])
    keys = [(int(front[i]), -crowd[i], *(-p[i]), i) for i in range(n)]
    order = np.array(sorted(range(n), key=lambda i: keys[i]), dtype=int)
    return order, front, crowd
