"""The simulator: paired counts + H&E-like patches with known truth (the default dataset).

Per slide a smooth random field picks a latent state per spot, and ``N_CONTINUOUS`` further
fields (shorter correlation length) give each spot continuous factors (cellularity, stroma,
nuclear size, fibre texture, chromatin, lymphocytes). Counts are negative-binomial from a
low-rank state model plus gene loadings of the factors; a donor shifts library size, scales
genes and adds dropout (all scaled by ``donor_effect``). Patches are rendered from the same
state and factors (see ``render``) with a donor stain look scaled by ``stain_effect``, so a
spot is identifiable beyond its state in both modalities (what cross-modal retrieval needs).
A donor-level mutation raises a small gene program and slightly enlarges nuclei.

The strengths below are balanced against each other: the states stay the dominant
expression clusters, a strong donor effect still dominates expression neighbourhoods, and
the factors carry enough per-spot signal for held-out retrieval well above chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hescape.config import SimulateConfig, SplitConfig
from hescape.data.contract import DatasetWriter, resolve_split
from hescape.data.render import donor_stain, render_patches, state_looks

SIMULATOR_VERSION = 3      # bump when the same SimulateConfig would give different data
                           # (3: donors over EXPR_BLOCK values drawn in row blocks)
SPOT_PITCH_UM = 100.0      # Visium centre-to-centre distance
PATCH_UM = 100.0           # field of view of one patch
RANK = 6
STATE_LFC_SCALE = 1.2      # strength of the latent states in expression
N_CONTINUOUS = 6           # per-spot factors seen by both modalities (render_patches reads 6)
BASE_LOG_MEAN = 1.5        # mean log rate of a gene (sets the sequencing depth)
CONT_LFC_SD = 0.3          # loadings of the continuous factors on genes
CONT_SCALE = 1.0           # sd of a continuous factor
FACTOR_LENGTH_UM = 80.0    # spatial correlation length of the continuous factors
CHUNK = 512               # patches rendered per block at 64 px (scaled by 1/size^2)
EXPR_BLOCK = 2**22         # expression values drawn per block (float64 temporaries ~32 MiB)


@dataclass
class Truth:
    """Ground-truth parameters shared by all donors."""

    base: np.ndarray          # G, log rate
    state_lfc: np.ndarray     # K x G
    mut_genes: np.ndarray     # indices of the mutation program
    cont_lfc: np.ndarray      # C x G loadings of the continuous spot factors


def _truth(cfg: SimulateConfig, rng: np.random.Generator) -> Truth:
    g = cfg.n_genes
    base = rng.normal(BASE_LOG_MEAN, 1.0, g)
    lfc = rng.normal(0, 1, (cfg.n_states, RANK)) @ rng.normal(0, 1.0 / np.sqrt(RANK), (RANK, g))
    mut = rng.choice(g, size=max(2, g // 12), replace=False)
    cont = rng.normal(0, CONT_LFC_SD, (N_CONTINUOUS, g))
    return Truth(base=base, state_lfc=STATE_LFC_SCALE * lfc, mut_genes=np.sort(mut), cont_lfc=cont)


def spot_grid(n: int) -> np.ndarray:
    """Hexagonal Visium-like spot centres (micrometres), n x 2 as (x, y)."""
    cols = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    row, col = i // cols, i % cols
    x = (col + 0.5 * (row % 2)) * SPOT_PITCH_UM
    y = row * SPOT_PITCH_UM * np.sqrt(3) / 2
    return np.stack([x, y], axis=1)


def latent_field(xy: np.ndarray, n_states: int, rng: np.random.Generator,
                 length_um: float = 350.0, n_feat: int = 12) -> np.ndarray:
    """Smooth random fields (random Fourier features), n x n_states."""
    w = rng.normal(0, 1.0 / length_um, (n_states, n_feat, 2))
    b = rng.uniform(0, 2 * np.pi, (n_states, n_feat))
    phase = np.einsum("nd,kfd->nkf", xy, w) + b
    return np.sqrt(2.0 / n_feat) * np.cos(phase).sum(-1)


def _counts(mu: np.ndarray, rng: np.random.Generator, theta: float = 6.0) -> np.ndarray:
    lam = rng.gamma(theta, mu / theta)
    return rng.poisson(lam)


def _donor_expression(cfg: SimulateConfig, truth: Truth, weights: np.ndarray, mutated: bool,
                      rng: np.random.Generator, cont: np.ndarray) -> sp.csr_matrix:
    """NB counts (CSR int32) for one donor's spots from soft state weights (n x K) and
    factors (n x C), drawn in row blocks of at most ``EXPR_BLOCK`` values (bounded memory).

    A donor that fits in one block draws in the order of SIMULATOR_VERSION 2 (same data)."""
    e = cfg.donor_effect
    n = len(weights)
    gene_shift = e * rng.normal(0, 0.6, cfg.n_genes)                  # per-gene donor factor
    lib = e * rng.normal(0, 0.5) + rng.normal(0, 0.25, n)              # library size

    def block(rows: slice) -> np.ndarray:
        log_mu = truth.base + weights[rows] @ truth.state_lfc + cont[rows] @ truth.cont_lfc
        if mutated:
            log_mu[:, truth.mut_genes] += 1.0
        log_mu += gene_shift
        log_mu += lib[rows, None]
        return _counts(np.exp(log_mu), rng)

    step = max(1, EXPR_BLOCK // cfg.n_genes)
    if n <= step:
        counts = block(slice(0, n))
        dropout = min(0.8, e * rng.uniform(0.05, 0.3))
        counts[rng.random(counts.shape) < dropout] = 0
        return sp.csr_matrix(counts.astype(np.int32))
    dropout = min(0.8, e * rng.uniform(0.05, 0.3))
    parts = []
    for start in range(0, n, step):
        counts = block(slice(start, start + step))
        counts[rng.random(counts.shape) < dropout] = 0
        parts.append(sp.csr_matrix(counts.astype(np.int32)))
    return sp.vstack(parts, format="csr")


def _slide_layout(cfg: SimulateConfig) -> list[int]:
    base, extra = divmod(cfg.spots_per_donor, cfg.slides_per_donor)
    return [base + (1 if i < extra else 0) for i in range(cfg.slides_per_donor)]


def _simulate_obs(cfg: SimulateConfig, rng: np.random.Generator):
    """Per-spot donor, slide, state, soft weights and coordinates."""
    donors = [f"D{d:02d}" for d in range(cfg.n_donors)]
    n_mut = int(np.clip(round(cfg.mutation_fraction * cfg.n_donors), 1, cfg.n_donors - 1))
    mutated = np.zeros(cfg.n_donors, dtype=bool)
    mutated[rng.choice(cfg.n_donors, n_mut, replace=False)] = True
    rows, weights, coords, conts = [], [], [], []
    for d, donor in enumerate(donors):
        for s, n in enumerate(_slide_layout(cfg)):
            xy = spot_grid(n)
            field = latent_field(xy, cfg.n_states, rng)
            conts.append(latent_field(xy, N_CONTINUOUS, rng, length_um=FACTOR_LENGTH_UM) * CONT_SCALE)
            state = field.argmax(1)
            w = np.exp(6.0 * (field - field.max(1, keepdims=True)))
            weights.append(w / w.sum(1, keepdims=True))
            coords.append(xy)
            rows.append(pd.DataFrame({"donor_idx": d, "donor": donor, "slide": f"{donor}_S{s}",
                                      "state_idx": state, "spot": np.arange(n)}))
    obs = pd.concat(rows, ignore_index=True)
    obs["mutation"] = np.where(mutated[obs["donor_idx"]], "mut", "wt")
    return obs, np.concatenate(weights), np.concatenate(coords), mutated, np.concatenate(conts)


def simulate_expression(cfg: SimulateConfig) -> tuple[AnnData, np.ndarray]:
    """The expression half: AnnData of integer counts, and per-donor mutation flags."""
    rng = np.random.default_rng(cfg.seed)
    truth = _truth(cfg, rng)
    obs, weights, coords, mutated, cont = _simulate_obs(cfg, rng)
    blocks = []
    for d in range(cfg.n_donors):
        sel = np.flatnonzero(obs["donor_idx"].to_numpy() == d)
        blocks.append(_donor_expression(cfg, truth, weights[sel], bool(mutated[d]), rng,
                                        cont[sel]))
    counts = sp.vstack(blocks, format="csr")  # sparse throughout: never N x G dense
    names = [f"{sl}_{i:05d}" for sl, i in zip(obs["slide"], obs["spot"], strict=True)]
    adata = AnnData(
        X=counts,
        obs=pd.DataFrame({
            "donor": obs["donor"].to_numpy(), "slide": obs["slide"].to_numpy(),
            "state": [f"state{k}" for k in obs["state_idx"]],
            "mutation": obs["mutation"].to_numpy(), "tissue": "simulated",
        }, index=pd.Index(names)),
        var=pd.DataFrame(index=pd.Index([f"G{g:04d}" for g in range(cfg.n_genes)])),
    )
    adata.obsm["spatial"] = coords.astype(np.float32)
    adata.var["mutation_program"] = np.isin(np.arange(cfg.n_genes), truth.mut_genes)
    adata.obs["state_idx"] = obs["state_idx"].to_numpy()
    adata.obsm["sim_factors"] = cont.astype(np.float32)  # continuous ground truth
    return adata, mutated


def simulate(out: str | Path, cfg: SimulateConfig | None = None, *,
             split: SplitConfig | None = None, progress: bool = True,
             overwrite: bool = False) -> Path:
    """Simulate a paired dataset and write it (atomically) as a canonical dataset at ``out``."""
    from tqdm.auto import tqdm

    cfg = cfg or SimulateConfig()
    adata, mutated = simulate_expression(cfg)
    split_dict = resolve_split(adata, split or SplitConfig(), source="simulate")
    states = adata.obs.pop("state_idx").to_numpy()
    factors = np.asarray(adata.obsm["sim_factors"], dtype=np.float32)
    donor_idx = adata.obs["donor"].cat.codes.to_numpy() if hasattr(
        adata.obs["donor"], "cat") else pd.factorize(adata.obs["donor"], sort=True)[0]
    img_rng = np.random.default_rng([cfg.seed, 1])
    looks = state_looks(cfg.n_states, img_rng)
    stains = [donor_stain(img_rng, cfg.stain_effect) for _ in range(cfg.n_donors)]
    with DatasetWriter(out, overwrite=overwrite) as writer:
        store = writer.allocate(adata.n_obs, cfg.patch_size)
        chunk = max(16, int(CHUNK * (64 / cfg.patch_size) ** 2))  # bounded memory
        # written through the file, not the memmap: dirty mapped pages would count in this
        # process's RSS until the whole store (GiBs at 200k spots) had passed through it
        with open(store.filename, "r+b") as fh:
            for start in tqdm(range(0, adata.n_obs, chunk), desc="render",
                              disable=not progress):
                sl = slice(start, start + chunk)
                rng = np.random.default_rng([cfg.seed, 2, start])
                block = render_patches(states[sl], donor_idx[sl], mutated[donor_idx[sl]],
                                       size=cfg.patch_size, looks=looks, stains=stains,
                                       rng=rng, factors=factors[sl])
                fh.seek(store.offset + start * block[0].nbytes)
                fh.write(np.ascontiguousarray(block).data)
        return writer.commit(adata, split_dict, source="simulate", mpp=PATCH_UM / cfg.patch_size,
                             extra={"simulate": cfg.model_dump()})


def tiny_dataset(out: str | Path, *, seed: int = 0, overwrite: bool = False,
                 **overrides) -> Path:
    """A tiny dataset for tests (4 donors x 60 spots, 40 genes, 16 px; ~0.2 s).

    Split: 2 train / 1 val / 1 test donors. ``overrides`` are SimulateConfig fields.
    """
    fields = {"n_donors": 4, "spots_per_donor": 60, "n_genes": 40, "n_states": 3,
              "patch_size": 16, "seed": seed, **overrides}
    split = SplitConfig(val_fraction=0.25, test_fraction=0.25, seed=seed)
    return simulate(out, SimulateConfig(**fields), split=split, progress=False,
                    overwrite=overwrite)
