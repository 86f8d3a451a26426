"""Image-side stain handling: Macenko normalisation (numpy) and HED jitter (torch).

``MacenkoNormalizer`` (Macenko et al. 2009) fits a reference stain matrix and maximal
concentrations on pixels pooled from *training donors'* patches, then maps every patch onto
it: per patch, its own stain matrix is estimated from the tissue pixels (optical density
above ``beta`` in every channel), concentrations are solved by least squares, scaled to the
reference's 99th percentiles and re-rendered with the reference stains. It works on whole
batches at once (batched eigen-decompositions); patches with too little tissue to estimate
stains (background, blank) are returned unchanged (``n_skipped`` counts them).

``hed_jitter`` is the Tellez et al. (2018) HED augmentation on float tensors in [0, 1]:
per image and stain channel, ``s' = s * U(1-k, 1+k) + U(-k, k)`` in HED optical density.
"""

from __future__ import annotations

import numpy as np

IO = 240.0  # transmitted light intensity (background white level)
BETA = 0.15  # OD threshold: below it in any channel a pixel counts as background
ALPHA = 1.0  # percentile of the extreme angles (robust to outliers)
MIN_TISSUE = 50  # pixels needed to estimate a patch's own stain matrix
FIT_PIXELS = 500_000  # pixels subsampled when fitting the reference
CHUNK_PIXELS = 1 << 22  # pixels per transform chunk (bounds memory)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)


def _as_batch(patches: np.ndarray) -> np.ndarray:
    x = np.asarray(patches)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB patches, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 (or H x W x 3) RGB patches, got {x.shape}")
    return x


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD = -log((I + 1) / Io), float32, same shape."""
    return -np.log((rgb.astype(np.float32) + 1.0) / IO)


def stain_matrices(od: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Per image (B x P x 3 OD, B x P tissue mask) the Macenko stain matrix, B x 3 x 2 (H, E)."""
    w = tissue.astype(np.float64)[..., None]
    n = np.maximum(w.sum(1), 1.0)  # B x 1
    mean = (od * w).sum(1) / n  # B x 3
    centred = (od - mean[:, None]) * w
    cov = np.einsum("bpi,bpj->bij", centred, centred) / n[..., None]
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, :, 1:3][:, :, ::-1]  # top-2 eigenvectors, B x 3 x 2
    plane = plane * np.where(plane[:, :1, :] < 0, -1.0, 1.0)  # point into positive OD
    proj = np.einsum("bpi,bik->bpk", od, plane)
    phi = np.where(tissue, np.arctan2(proj[..., 1], proj[..., 0]), np.nan)
    lo = np.nanpercentile(phi, ALPHA, axis=1)
    hi = np.nanpercentile(phi, 100 - ALPHA, axis=1)
    v_lo = np.einsum("bik,bk->bi", plane, np.stack([np.cos(lo), np.sin(lo)], 1))
    v_hi = np.einsum("bik,bk->bi", plane, np.stack([np.cos(hi), np.sin(hi)], 1))
    h_first = (v_lo[:, 0] > v_hi[:, 0])[:, None]  # haematoxylin has the larger red OD
    h = np.where(h_first, v_lo, v_hi)
    e = np.where(h_first, v_hi, v_lo)
    he = np.stack([h, e], axis=2)
    return he / np.linalg.norm(he, axis=1, keepdims=True)


def concentrations(od: np.ndarray, he: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations, B x P x 2."""
    return np.einsum("bki,bpi->bpk", np.linalg.pinv(he), od)


class MacenkoNormalizer:
    """Fit on training patches (uint8), then ``transform`` any patches onto that reference."""

    def __init__(self) -> None:
        self.stain_matrix: np.ndarray | None = None  # 3 x 2 (H, E)
        self.max_conc: np.ndarray | None = None  # 2
        self.n_skipped = 0

    def fit(self, patches: np.ndarray, *, seed: int = 0) -> MacenkoNormalizer:
        """Estimate the reference stains from the pooled tissue pixels of ``patches``."""
        od = optical_density(_as_batch(patches)).reshape(-1, 3)
        od = od[(od > BETA).all(axis=1)]
        if len(od) < MIN_TISSUE:
            raise ValueError(f"only {len(od)} tissue pixels in the fit patches (need "
                             f">= {MIN_TISSUE}); fit on patches that contain tissue")
        if len(od) > FIT_PIXELS:
            od = od[np.random.default_rng(seed).choice(len(od), FIT_PIXELS, replace=False)]
        he = stain_matrices(od[None], np.ones((1, len(od)), dtype=bool))
        conc = concentrations(od[None], he)[0]
        self.stain_matrix = he[0]
        self.max_conc = np.percentile(conc, 99, axis=0)
        return self

    def transform(self, patches: np.ndarray) -> np.ndarray:
        """Stain-normalised copy of ``patches`` (uint8, same shape)."""
        if self.stain_matrix is None:
            raise RuntimeError("MacenkoNormalizer.transform before fit(); fit on training patches")
        x = _as_batch(patches)
        out = np.empty_like(x)
        per = max(1, CHUNK_PIXELS // (x.shape[1] * x.shape[2]))
        self.n_skipped = 0
        for start in range(0, len(x), per):
            out[start:start + per] = self._chunk(x[start:start + per])
        return out.reshape(np.shape(patches))

    def _chunk(self, rgb: np.ndarray) -> np.ndarray:
        b, h, w, _ = rgb.shape
        od = optical_density(rgb).reshape(b, h * w, 3).astype(np.float64)
        tissue = (od > BETA).all(axis=2)
        ok = tissue.sum(1) >= MIN_TISSUE
        self.n_skipped += int((~ok).sum())
        out = rgb.copy()
        if not ok.any():
            return out
        od, tissue = od[ok], tissue[ok]
        he = stain_matrices(od, tissue)
        conc = concentrations(od, he)
        max_c = np.nanpercentile(np.where(tissue[..., None], conc, np.nan), 99, axis=1)
        conc *= (self.max_conc / np.maximum(max_c, 1e-6))[:, None, :]
        norm = IO * np.exp(-conc @ self.stain_matrix.T)
        out[ok] = np.clip(norm, 0, 255).round().astype(np.uint8).reshape(-1, h, w, 3)
        return out


def hed_jitter(x, strength: float, generator=None):
    """HED colour augmentation of float images ``x`` (B x 3 x H x W in [0, 1]).

    ``strength`` k draws per image and stain a scale in [1-k, 1+k] and a shift in [-k, k]
    (OD units); k = 0 returns ``x`` itself. Deterministic given ``generator``.
    """
    import torch

    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected B x 3 x H x W, got {tuple(x.shape)}")
    if strength == 0:
        return x
    dev = generator.device if generator is not None else x.device
    rand = torch.rand((2, x.shape[0], 3), generator=generator, device=dev).to(x.device)
    scale = 1 + strength * (2 * rand[0] - 1)
    shift = strength * (2 * rand[1] - 1)
    rgb_from_hed = torch.as_tensor(RGB_FROM_HED, dtype=torch.float32, device=x.device)
    hed_from_rgb = torch.linalg.inv(rgb_from_hed)
    od = -torch.log(x.float().clamp_min(1e-6))
    stains = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
    stains = stains * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("bdhw,dc->bchw", stains, rgb_from_hed)
    return torch.exp(-od).clamp(0, 1).to(x.dtype)
