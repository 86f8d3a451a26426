"""Procedural H&E-like patches: eosin stroma, nuclei, lymphocytes, lumen; donor stain shifts.

Colours follow Beer-Lambert: RGB = 255 * exp(-(h * H_od + e * E_od)), with the
Ruifrok-Johnston stain vectors; a donor perturbs the vectors, blurs and adds noise.
Everything is vectorised over a chunk of patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

H_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
E_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32)
DENSITY_GAIN = 0.7   # log nuclei density per unit of spot factor 0 (cellularity)
STROMA_GAIN = 0.5    # log stroma eosin per unit of spot factor 1
SIZE_GAIN = 1.0      # log nucleus-threshold per unit of spot factor 2 (nuclear size)
TEXTURE_GAIN = 1.0   # log fibre-texture contrast per unit of spot factor 3
HEMA_GAIN = 0.3      # log haematoxylin (chromatin) intensity per unit of spot factor 4
LYMPH_RATE = 3.0     # mean count of small round lymphocyte nuclei per patch at factor 5 = 0
LYMPH_GAIN = 1.0     # log lymphocyte count per unit of spot factor 5
N_RENDERED = 6       # spot factors the renderer reads


@dataclass(frozen=True)
class StateLook:
    """Morphology of one latent state."""

    density: float    # nuclei per 32 x 32 px
    size: float       # nucleus sigma in px at 32 px patches
    aspect: float     # elongation (1 = round)
    lumen: float      # probability of a lumen / white area
    stroma: float     # eosin concentration of the stroma


@dataclass(frozen=True)
class DonorStain:
    """Scanner/stain look of one donor."""

    h_od: np.ndarray
    e_od: np.ndarray
    blur: float
    noise: float
    gain: float


def state_looks(n_states: int, rng: np.random.Generator) -> list[StateLook]:
    """Distinct morphologies spread over the range of each property."""
    t = np.linspace(0.0, 1.0, n_states)
    perm = [rng.permutation(n_states) for _ in range(4)]
    return [StateLook(density=2.0 + 7.0 * t[perm[0][k]], size=0.8 + 0.7 * t[perm[1][k]],
                      aspect=1.0 + 1.5 * t[perm[2][k]], lumen=0.6 * t[perm[3][k]] ** 2,
                      stroma=0.35 + 0.4 * t[(perm[0][k] + 1) % n_states])
            for k in range(n_states)]


def donor_stain(rng: np.random.Generator, strength: float) -> DonorStain:
    """Random stain vectors / blur / noise; ``strength`` 0 gives the reference look."""
    h = H_OD * np.exp(strength * rng.normal(0, 0.18, 3)).astype(np.float32)
    e = E_OD * np.exp(strength * rng.normal(0, 0.18, 3)).astype(np.float32)
    return DonorStain(h_od=h, e_od=e, blur=float(strength * rng.uniform(0.0, 0.9)),
                      noise=float(strength * rng.uniform(1.0, 6.0)),
                      gain=float(np.exp(strength * rng.normal(0, 0.12))))


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """dst x src linear-interpolation weights (pixel centres aligned)."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    w = np.zeros((dst, src), dtype=np.float32)
    np.add.at(w, (np.arange(dst), lo), 1 - (pos - lo))
    np.add.at(w, (np.arange(dst), hi), pos - lo)
    return w


def resize_stack(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x s x s maps to N x size x size (two matmuls, BLAS-fast)."""
    if x.shape[1] == size:
        return x
    w = _interp_matrix(x.shape[1], size)
    return np.matmul(np.matmul(w, x), w.T)


def _smooth_noise(rng: np.random.Generator, n: int, size: int, grid: int) -> np.ndarray:
    return resize_stack(rng.random((n, grid, grid), dtype=np.float32), size)


def _nuclei(rng, looks: list[StateLook], states: np.ndarray, size: int,
            size_scale: np.ndarray, density_scale: np.ndarray,
            threshold: np.ndarray | None = None,
            lymph_rate: np.ndarray | None = None) -> np.ndarray:
    """Haematoxylin concentration map of the nuclei, N x S x S in [0, ~1.3].

    A patch covers a fixed field of view, so the nuclei count does not depend on ``size``.
    Blobs are drawn at a working resolution of 32-64 px and resized before the threshold
    (sharp edges at any size, cost independent of ``size``).
    """
    n = len(states)
    work = min(max(size, 32), 64)
    scale = work / 32.0
    out = np.zeros((n, work, work), dtype=np.float32)
    counts = rng.poisson(1.5 * np.array([looks[s].density for s in states]) * density_scale)
    rows = np.repeat(np.arange(n), counts)
    ys, xs = rng.integers(0, work, len(rows)), rng.integers(0, work, len(rows))
    np.add.at(out, (rows, ys, xs), 1.0)
    flip = rng.random(n) < 0.5
    for k, look in enumerate(looks):
        for f in (False, True):
            sel = np.flatnonzero((states == k) & (flip == f))
            if not len(sel):
                continue
            sig = look.size * scale * float(np.mean(size_scale[sel]))
            sy, sx = (sig * look.aspect, sig) if f else (sig, sig * look.aspect)
            peak = 1.0 / (2 * np.pi * sy * sx)
            out[sel] = ndimage.gaussian_filter(out[sel], (0, sy, sx), truncate=3.0) / peak
    if lymph_rate is not None and lymph_rate.max() > 0:  # small dark round nuclei
        lym = np.zeros_like(out)
        counts = rng.poisson(lymph_rate)
        rows = np.repeat(np.arange(n), counts)
        ys, xs = rng.integers(0, work, len(rows)), rng.integers(0, work, len(rows))
        np.add.at(lym, (rows, ys, xs), 1.0)
        sig = 0.6 * scale
        out += ndimage.gaussian_filter(lym, (0, sig, sig), truncate=3.0) * (2 * np.pi * sig**2)
    out = resize_stack(out, size)
    thr = np.full(n, 0.25, np.float32) if threshold is None else threshold.astype(np.float32)
    return np.clip(1.3 * (out - thr[:, None, None]), 0.0, 1.3)


def _lumen(rng, looks: list[StateLook], states: np.ndarray, size: int) -> np.ndarray:
    n = len(states)
    has = rng.random(n) < np.array([looks[s].lumen for s in states])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, (2, n, 1, 1)).astype(np.float32) * size
    a, b = rng.uniform(0.12, 0.35, (2, n, 1, 1)).astype(np.float32) * size
    inside = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 < 1.0
    return (inside & has[:, None, None]).astype(np.float32)


def render_patches(states: np.ndarray, donor_idx: np.ndarray, mutated: np.ndarray, *,
                   size: int, looks: list[StateLook], stains: list[DonorStain],
                   rng: np.random.Generator, factors: np.ndarray | None = None) -> np.ndarray:
    """Render uint8 N x size x size x 3 patches for spots with these states/donors.

    ``factors`` (N x k, the continuous spot factors that also drive expression; missing
    columns count as 0) modulate, in order: nuclei density (cellularity), stroma eosin,
    nuclear size, fibre-texture contrast, chromatin (haematoxylin) intensity and the number
    of small lymphocyte nuclei, so images carry spot-level signal beyond the state.
    """
    n = len(states)
    f = np.zeros((n, N_RENDERED), dtype=np.float32)
    if factors is not None:
        k = min(N_RENDERED, factors.shape[1])
        f[:, :k] = factors[:, :k]
    size_scale = np.where(mutated, 1.12, 1.0)  # subtle morphology cue of the mutation
    h = _nuclei(rng, looks, states, size, size_scale, np.exp(DENSITY_GAIN * f[:, 0]),
                threshold=np.clip(0.25 * np.exp(-SIZE_GAIN * f[:, 2]), 0.05, 0.7),
                lymph_rate=LYMPH_RATE * np.exp(LYMPH_GAIN * f[:, 5]))
    h = h * np.exp(HEMA_GAIN * f[:, 4]).astype(np.float32)[:, None, None]
    lumen = _lumen(rng, looks, states, size)
    fibres = _smooth_noise(rng, n, size, max(3, min(size, 64) // 6))
    stroma = np.array([looks[s].stroma for s in states], dtype=np.float32)
    stroma = (stroma * np.exp(STROMA_GAIN * f[:, 1]).astype(np.float32))[:, None, None]
    contrast = np.clip(0.45 * np.exp(TEXTURE_GAIN * f[:, 3]), 0.05, 0.95)[:, None, None]
    e = stroma * (1.0 - contrast + 2.0 * contrast * fibres) * (1.0 - lumen)
    h = h * (1.0 - 0.8 * lumen) + 0.04
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for d in np.unique(donor_idx):
        sel = np.flatnonzero(donor_idx == d)
        st = stains[d]
        for c in range(3):  # one channel at a time, in place: few passes over memory
            ch = h[sel] * np.float32(-st.gain * st.h_od[c])
            ch -= e[sel] * np.float32(st.gain * st.e_od[c])
            np.exp(ch, out=ch)
            ch *= 255.0
            if st.blur > 0.05:
                ch = ndimage.gaussian_filter(ch, (0, st.blur, st.blur), truncate=2.0)
            ch += st.noise * rng.standard_normal(ch.shape, dtype=np.float32)
            np.clip(ch, 0, 255, out=ch)
            out[sel, :, :, c] = ch
    return out
