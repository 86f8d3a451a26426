"""The one embedding loop (``hescape.train.embed``): validation, checkpoint evaluation and
the feature cache give what a direct model forward gives, and honour ``train.precision``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hescape.train.dataset import images_to_input
from hescape.train.device import Compute

CPU = Compute(torch.device("cpu"))


def _model_and_inputs(cfg):
    """The model the training loop starts from, and its inputs (as the loop loads them)."""
    from hescape.train.inputs import load_train_inputs, prepare_inputs
    from hescape.train.loop import build_model_and_optimizer

    paths = prepare_inputs(cfg, progress=False)
    data = load_train_inputs({"cfg": cfg.model_dump(mode="json"), **paths}, cfg)
    model, _ = build_model_and_optimizer(cfg, data, torch.device("cpu"), False)
    return model.eval(), data


@torch.no_grad()
def _direct(model, data, rows) -> dict[str, torch.Tensor]:
    """One plain forward of ``rows``: no batching, no loop."""
    image = images_to_input(np.asarray(data.paired.patches[rows]), model.image_encoder,
                            stain=data.stain)
    gene = torch.as_tensor(np.asarray(data.gene_x[rows], dtype=np.float32))
    return model(gene=gene, image=image)


def test_embeddings_match_a_direct_forward(make_cfg):
    from hescape.train.embed import compute_embeddings

    model, data = _model_and_inputs(make_cfg())
    rows = data.val_idx[::3]
    direct = _direct(model, data, rows)
    emb = compute_embeddings(model, compute=CPU, gene_x=data.gene_x, images=data.paired.patches,
                             rows=rows, batch_size=7, stain=data.stain)
    np.testing.assert_allclose(emb["img"], direct["img_emb"].numpy(), atol=1e-6)
    np.testing.assert_allclose(emb["gene"], direct["gene_emb"].numpy(), atol=1e-6)
    image_only = compute_embeddings(model, compute=CPU, images=data.paired.patches, rows=rows,
                                    batch_size=7, stain=data.stain)
    assert image_only["gene"] is None
    np.testing.assert_allclose(image_only["img"], direct["img_emb"].numpy(), atol=1e-6)


def test_validation_metrics_are_those_of_a_direct_forward(make_cfg):
    """``validate`` embeds through the loop; its retrieval and loss equal the direct ones."""
    from hescape.losses import create_loss
    from hescape.metrics.retrieval import cross_modal_retrieval
    from hescape.train.validate import validate

    cfg = make_cfg()
    model, data = _model_and_inputs(cfg)
    got = validate(model, data, cfg, compute=CPU)
    rows, ec = data.val_idx, cfg.eval
    direct = _direct(model, data, rows)
    img, gene = direct["img_emb"].numpy(), direct["gene_emb"].numpy()
    want = cross_modal_retrieval(img, gene, donors=data.donor_names[rows], ks=ec.ks,
                                 block_size=ec.block_size, inbatch_size=ec.inbatch_size,
                                 inbatch_repeats=ec.inbatch_repeats, seed=ec.seed)
    for key, value in want.items():
        assert got[f"val/{key}"] == pytest.approx(value, abs=1e-6), key
    loss_fn, bs, losses, sizes = create_loss(cfg.loss), cfg.train.batch_size, [], []
    for start in range(0, len(rows), bs):
        out = _direct(model, data, rows[start:start + bs])
        if len(out["img_emb"]) > 1:
            losses.append(float(loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"],
                                        out["logit_bias"])))
            sizes.append(len(out["img_emb"]))
    assert got["val/loss"] == pytest.approx(np.average(losses, weights=sizes), rel=1e-5)


def test_checkpoint_evaluation_embeds_as_a_direct_forward(make_cfg, tmp_path):
    import anndata as ad

    from hescape.evaluate.checkpoint_eval import evaluate_checkpoint
    from hescape.train.checkpoint import save_checkpoint
    from hescape.train.loop import checkpoint_meta

    cfg = make_cfg()
    model, data = _model_and_inputs(cfg)
    ckpt = save_checkpoint(tmp_path / "checkpoint_0000000", model=model, cfg=cfg,
                           meta=checkpoint_meta(data, 0, {}))
    _, arts = evaluate_checkpoint(ckpt, cfg.data.path, out_dir=tmp_path / "eval", batch_size=16,
                                  eval_overrides=["plots=false", "baselines=false"],
                                  progress=False)
    saved = ad.read_h5ad(arts["embeddings"])  # the test rows
    direct = _direct(model, data, data.paired.indices("test"))
    np.testing.assert_allclose(saved.obsm["img"], direct["img_emb"].numpy(), atol=1e-6)
    np.testing.assert_allclose(saved.obsm["gene"], direct["gene_emb"].numpy(), atol=1e-6)


def test_the_loop_autocasts_by_train_precision(make_cfg):
    """bf16 autocast where the training has it (here ``precision: bf16`` on CPU)."""
    from hescape.train.embed import iter_outputs

    cfg = make_cfg(precision="bf16")
    model, data = _model_and_inputs(cfg)
    kw = dict(gene_x=data.gene_x, images=data.paired.patches, rows=data.val_idx[:8],
              stain=data.stain)
    bf16 = next(iter_outputs(model, compute=Compute.of(cfg.train, "cpu"), **kw))
    fp32 = next(iter_outputs(model, compute=CPU, **kw))
    assert bf16["img_emb"].dtype == torch.bfloat16 and fp32["img_emb"].dtype == torch.float32
    torch.testing.assert_close(bf16["img_emb"].float(), fp32["img_emb"], atol=0.05, rtol=0)


def test_bf16_feature_cache_has_its_own_key(make_cfg, tmp_path):
    """Features computed under bf16 autocast never answer for fp32 ones (and vice versa);
    fp32 keys are those from before the key recorded precision."""
    from hescape.data import load_paired
    from hescape.train.features import cached_features, feature_cache_key, frozen_image_encoder

    frozen = {"extra": {"model": {"image": {"mode": "frozen"}}}}
    fp32_cfg = make_cfg(precision="fp32", **frozen)
    paired = load_paired(fp32_cfg.data.path)
    fp32 = cached_features(fp32_cfg, paired, progress=False)
    auto_cpu = cached_features(make_cfg(precision="auto", **frozen), paired, progress=False)
    bf16 = cached_features(make_cfg(precision="bf16", **frozen), paired, progress=False)
    gpu_study = cached_features(make_cfg(use_gpu=True, **frozen), paired, progress=False)
    assert fp32 == auto_cpu and bf16 == gpu_study and bf16 != fp32
    encoder = frozen_image_encoder(fp32_cfg)
    old_key = feature_cache_key(encoder, paired.fingerprint, "none", paired.split["train"])
    assert fp32.stem == old_key
    assert json.loads(bf16.with_suffix(".json").read_text())["precision"] == "bfloat16"
    assert json.loads(fp32.with_suffix(".json").read_text())["precision"] == "float32"
    a, b = np.load(fp32), np.load(bf16)
    assert a.shape == b.shape and not np.array_equal(a, b)  # autocast really ran
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())
    assert sorted(p.name for p in Path(fp32).parent.iterdir() if p.name.startswith(".")) == []
