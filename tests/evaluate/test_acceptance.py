"""Acceptance (issue #6): the product path learns, and the donor adversary mixes donors.

Simulator with strong donor effects (``donor_effect`` 2.5, 8 donors: 4 train / 2 val / 2 test),
a frozen ImageNet EfficientNet-Lite0 image tower, and everything through the product path:
``hescape.train.fit`` in-process (1 CPU worker) -> checkpoint -> ``hescape.evaluate``.

(a) Held-out retrieval (whole test set, image -> gene, ``evaluate_checkpoint``): the trained
    model against the same architecture at its step-0 weights (exactly the weights the
    training loop starts from: ``build_model_and_optimizer``), and against chance.
(b) Batch mixing of the GENE embedding (``hescape.metrics.mixing``) with the donor adversary
    on (gene tower, weight 1) vs off, same seeds. Measured on the training donors' spots:
    the adversary can only remove the donor signal of donors it is trained on. On the
    held-out donors its effect on iLISI was not consistent across seeds (measured while
    writing this: -0.15 .. +0.11), so nothing is asserted there.

Measured while writing (dataset seed 0 as here, training seeds 0-5; then dataset seeds 1-2
x training seeds 0-1; then 10 runs with dataset seed = training seed):
(a) test mean rank trained 80-87 vs step 0 146-155 (chance (N + 1) / 2 = 150.5, N = 300);
    trained / step-0 ratio 0.53-0.59 here, 0.66-0.76 on the other datasets (bound 0.8).
    R@10 0.09-0.14 vs step 0 0.03-0.04 (chance 0.033); on other datasets as low as 0.057,
    hence the looser R@10 bound. R@5 is noisier still at N = 300 (one run at chance), so
    mean rank is the main criterion.
(b) training-donor iLISI gain with the adversary +0.12 .. +0.27 here (seeds 0, 1: +0.14,
    +0.19), +0.09 .. +0.17 on the other datasets, +0.03 .. +0.18 in the 10 mixed runs;
    kBET gain +0.01 .. +0.37.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = {"n_donors": 8, "spots_per_donor": 150, "n_genes": 100, "n_states": 4,
        "donor_effect": 2.5, "stain_effect": 0.5, "patch_size": 32}
IMAGE = {"name": "efficientnet_lite0", "pretrained": True, "mode": "frozen", "image_size": 64}
STEPS = 150
MIXING_SEEDS = (0, 1)
EVAL = ["baselines=false", "plots=false", "inbatch_repeats=2"]


def _tiny_config():
    """``tiny_config`` of tests/train/conftest.py (conftests are not importable by name)."""
    path = Path(__file__).resolve().parents[1] / "train" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_train_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_config


def study_config(storage: Path, data: Path, *, seed: int, adversary: bool):
    adv = {"enabled": adversary, "weight": 1.0 if adversary else 0.0, "towers": ["gene"]}
    return _tiny_config()(storage, data, max_steps=STEPS, eval_every=STEPS // 3, lr=3e-3,
                          batch_size=64, seed=seed,
                          extra={"model": {"image": IMAGE, "adversary": adv}})


@pytest.fixture(scope="module")
def strong_data(tmp_path_factory) -> Path:
    from hescape.data import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("acceptance") / "strong", seed=0, **DATA)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, strong_data):
    """``trained(seed, adversary)`` -> (cfg, FitResult), each fitted once per module."""
    from hescape.train import fit

    root = tmp_path_factory.mktemp("acceptance-runs")
    done: dict = {}

    def get(seed: int, adversary: bool):
        key = (seed, adversary)
        if key not in done:
            cfg = study_config(root / "storage", strong_data, seed=seed, adversary=adversary)
            result = fit(cfg, run_dir=root / f"seed{seed}-adv{int(adversary)}", verbose=False)
            done[key] = (cfg, result)
        return done[key]

    return get


def step0_checkpoint(cfg, like: Path, out: Path) -> Path:
    """A checkpoint of the model the training loop starts from (same seed, no step taken)."""
    import torch

    from hescape.train.checkpoint import load_checkpoint, save_checkpoint
    from hescape.train.inputs import load_train_inputs, prepare_inputs
    from hescape.train.loop import build_model_and_optimizer

    paths = prepare_inputs(cfg, progress=False)
    inputs = load_train_inputs({"cfg": cfg.model_dump(mode="json"), **paths}, cfg)
    model, _ = build_model_and_optimizer(cfg, inputs, torch.device("cpu"), False)
    meta = {**load_checkpoint(like, with_train_state=False).meta, "step": 0, "metrics": {}}
    return save_checkpoint(out / "checkpoint_0000000", model=model, cfg=cfg, meta=meta)


def gene_mixing_on_training_donors(ckpt: Path, data: Path) -> dict[str, float]:
    """Batch-mixing metrics (donor as batch, state as label) of the gene embedding."""
    from hescape.data import load_paired
    from hescape.metrics.mixing import mixing_metrics
    from hescape.train.trained import embed_split

    paired = load_paired(data)
    emb = embed_split(ckpt, paired, "train")
    obs = paired.adata.obs.iloc[emb["index"]]
    return mixing_metrics(emb["gene"], obs["donor"].to_numpy(), obs["state"].to_numpy(),
                          subsample=None)


@pytest.mark.slow
def test_trained_model_beats_its_random_init_on_heldout_retrieval(trained, strong_data,
                                                                   tmp_path):
    from hescape.evaluate.checkpoint_eval import evaluate_checkpoint

    cfg, result = trained(0, False)
    init = step0_checkpoint(cfg, result.best_checkpoint, tmp_path / "init")
    learned, _ = evaluate_checkpoint(result.best_checkpoint, strong_data, out_dir=tmp_path / "a",
                                     eval_overrides=EVAL, progress=False)
    random, _ = evaluate_checkpoint(init, strong_data, out_dir=tmp_path / "b",
                                    eval_overrides=EVAL, progress=False)
    n = learned["test/retrieval_n"]
    assert n == random["test/retrieval_n"] == 2 * DATA["spots_per_donor"]  # the 2 test donors
    chance_rank, chance_r10 = (n + 1) / 2, 10 / n
    rank, rank0 = learned["test/mean_rank_img2gene"], random["test/mean_rank_img2gene"]
    summary = {"trained": rank, "step0": rank0, "chance": chance_rank,
               "r10": learned["test/r10_img2gene"], "r10_step0": random["test/r10_img2gene"]}
    # the untrained model is a real baseline: at chance, not secretly aligned
    assert abs(rank0 / chance_rank - 1) < 0.15, summary
    assert rank < 0.8 * rank0 and rank < 0.8 * chance_rank, summary
    assert learned["test/r10_img2gene"] > 1.5 * chance_r10, summary
    assert learned["test/r10_img2gene"] > random["test/r10_img2gene"], summary


@pytest.mark.slow
def test_donor_adversary_mixes_donors_in_gene_embedding(trained, strong_data):
    gains = {"ilisi": [], "kbet": []}
    seen = {}
    for seed in MIXING_SEEDS:
        off = gene_mixing_on_training_donors(trained(seed, False)[1].best_checkpoint, strong_data)
        on = gene_mixing_on_training_donors(trained(seed, True)[1].best_checkpoint, strong_data)
        for key in gains:
            gains[key].append(on[key] - off[key])
        seen[seed] = {k: (round(off[k], 3), round(on[k], 3)) for k in ("ilisi", "kbet",
                                                                         "silhouette_batch")}
    assert all(g > 0 for g in gains["ilisi"]), seen
    assert np.mean(gains["ilisi"]) > 0.04, seen
    assert np.mean(gains["kbet"]) > 0.0, seen
