"""A readable summary of a dataset: donors, spots per donor, genes, labels, split."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hescape.data.contract import PairedData


def describe(data: PairedData, *, max_levels: int = 8) -> str:
    """Summary text of a loaded dataset."""
    a, m = data.adata, data.manifest
    obs = a.obs
    counts = obs["donor"].astype(str).value_counts().sort_index()
    part = {d: p for p, ds in data.split.items() for d in ds}
    lines = [
        f"dataset      {data.path}",
        f"source       {m.get('source')}   format v{m.get('format_version')}",
        f"fingerprint  {data.fingerprint} ({m.get('fingerprint_mode', 'full')})",
        f"spots        {a.n_obs:,}   genes {a.n_vars:,}"
        + ("" if m.get("integer_counts", True) else "   (NON-INTEGER expression)"),
        f"patches      {data.patches.shape[1]} x {data.patches.shape[2]} px, "
        f"mpp {m.get('mpp') if m.get('mpp') is not None else 'unknown'}",
        f"slides       {obs['slide'].nunique()}",
        f"donors       {len(counts)}",
    ]
    for donor, n in counts.items():
        slides = obs.loc[obs["donor"].astype(str) == donor, "slide"].nunique()
        lines.append(f"  {donor:<16} {n:>7,} spots  {slides} slide(s)  [{part.get(donor, '?')}]")
    lines.append("split")
    for p in ("train", "val", "test"):
        donors = data.split.get(p, [])
        n = int(counts.reindex(donors).fillna(0).sum())
        lines.append(f"  {p:<6} {len(donors)} donors, {n:,} spots: {', '.join(donors)}")
    lines.append("labels")
    for col in m.get("label_columns", []):
        if col not in obs.columns:
            continue
        vc = obs[col].astype(str).value_counts()
        shown = ", ".join(f"{k}={v}" for k, v in vc.head(max_levels).items())
        more = f", ... ({len(vc)} levels)" if len(vc) > max_levels else ""
        lines.append(f"  {col:<12} {shown}{more}")
    return "\n".join(lines)
