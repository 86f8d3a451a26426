"""In-process training on the simulator: learns, resumes exactly, stops on NaN."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hescape.preprocess import PreparedExpression
from hescape.preprocess.cache import save_entry
from hescape.train import fit, runs_in_process
from hescape.train.checkpoint import load_checkpoint, load_model
from hescape.train.inputs import load_prepared, prepare_inputs
from hescape.train.loop import TrainingError


def test_in_process_training_beats_chance(make_cfg, tmp_path, learnable_data):
    """Chance: R@10 = 10 / n, mean rank = (n + 1) / 2. The simulator's spots come in a few
    discrete states plus weak continuous factors, so exact-pair retrieval stays modest."""
    cfg = make_cfg(learnable_data, max_steps=150, eval_every=50, lr=5e-3, batch_size=64)
    assert runs_in_process(cfg)
    seen = []
    result = fit(cfg, run_dir=tmp_path / "run", verbose=False,
                 report_callback=lambda m, c: seen.append((m["step"], c)))
    assert [s for s, _ in seen] == [50, 100, 150]
    assert all(c is not None and (c / "model.pt").is_file() for _, c in seen)
    best = result.best_metrics
    n = best["val/retrieval_n"]
    assert best["val/r10_img2gene"] > 1.5 * 10 / n
    assert best["val/mean_rank_img2gene"] < 0.7 * (n + 1) / 2
    assert result.best_checkpoint.name == f"checkpoint_{int(best['step']):07d}"
    for key in ("train/loss", "val/loss", "val/r5_img2gene", "val/donor_acc_gene",
                "val/donor_chance", "train/lr", "train/steps_per_s"):
        assert np.isfinite(result.metrics[key]), key
    model, loaded_cfg, meta = load_model(result.best_checkpoint)
    assert loaded_cfg == cfg and meta["step"] == best["step"] and not model.training


def _weights(ckpt):
    return load_checkpoint(ckpt, with_train_state=False).model_state


def test_resumed_run_matches_uninterrupted(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=40, eval_every=10)  # gene dropout 0.1: RNG state matters
    full = fit(cfg, run_dir=tmp_path / "full", verbose=False)
    middle = tmp_path / "full" / "checkpoint_0000020"
    resumed = fit(cfg, run_dir=tmp_path / "resumed", resume_from=middle, verbose=False)
    assert [h["step"] for h in resumed.history] == [30, 40]
    for key in ("train/loss", "val/loss", "val/r5_img2gene", "val/mean_rank_img2gene"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5, abs=1e-7)
    a = _weights(tmp_path / "full" / "checkpoint_0000040")
    b = _weights(tmp_path / "resumed" / "checkpoint_0000040")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_and_compile_paths_train(make_cfg, tmp_path):
    """The GPU precision path (bf16 autocast, asked for explicitly so it runs on CPU) and the
    peak-memory metrics; torch.compile is covered in the slow variant below."""
    cfg = make_cfg(max_steps=10, eval_every=5, precision="bf16")
    result = fit(cfg, run_dir=tmp_path / "bf16", verbose=False)
    assert np.isfinite(result.metrics["train/loss"]) and np.isfinite(result.metrics["val/loss"])
    assert result.metrics["sys/peak_rss_mib"] > 50  # a torch process is at least this big
    fp32 = fit(make_cfg(max_steps=10, eval_every=5, precision="fp32"),
               run_dir=tmp_path / "fp32", verbose=False)
    # autocast really ran: bf16 rounding changes the loss, but not by much
    assert result.metrics["train/loss"] != fp32.metrics["train/loss"]
    assert result.metrics["train/loss"] == pytest.approx(fp32.metrics["train/loss"], rel=0.05)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_memory_counts_from_the_run_start():
    """A Tune actor reused across trials keeps its process: each run's peak starts afresh."""
    from hescape.train.loop import peak_memory, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    with_big = peak_memory(cpu)["sys/peak_rss_mib"]
    del big
    reset_peak_memory(cpu)
    after = peak_memory(cpu)["sys/peak_rss_mib"]
    assert with_big - after > 200, (with_big, after)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(make_cfg, tmp_path):
    eager = fit(make_cfg(max_steps=6, eval_every=3, precision="fp32"),
                run_dir=tmp_path / "eager", verbose=False)
    compiled = fit(make_cfg(max_steps=6, eval_every=3, precision="fp32", compile=True),
                   run_dir=tmp_path / "compiled", verbose=False)
    for key in ("train/loss", "val/loss"):
        # fused kernels round differently: close, not bitwise
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-2)


def test_rerun_in_same_run_dir_resumes(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=20, eval_every=10)
    fit(cfg, run_dir=tmp_path / "run", verbose=False)
    again = fit(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 30})}),
                run_dir=tmp_path / "run", verbose=False)
    assert [h["step"] for h in again.history] == [30]


def test_nan_loss_stops_with_clear_error(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=10)
    paths = prepare_inputs(cfg, progress=False)
    good = load_prepared(paths["prepared_path"])
    x = good.X.copy()
    x[:, 0] = np.nan
    bad = tmp_path / "bad-expr"
    save_entry(bad, PreparedExpression(X=x, feature_names=good.feature_names,
                                       saw_heldout=False, method="none", cache_key="bad"))
    with pytest.raises(TrainingError, match="non-finite loss at step 0"):
        fit(cfg, run_dir=tmp_path / "run", prepared_path=bad, verbose=False)


def test_embed_split_reproduces_validation_retrieval(make_cfg, tmp_path, tiny_data):
    from hescape.data import load_paired
    from hescape.metrics.retrieval import cross_modal_retrieval
    from hescape.train.trained import embed_split

    cfg = make_cfg(max_steps=20, eval_every=10)
    result = fit(cfg, run_dir=tmp_path / "run", verbose=False)
    paired = load_paired(tiny_data)
    emb = embed_split(result.best_checkpoint, paired, "val")
    assert emb["img"].shape == emb["gene"].shape and len(emb["index"]) == len(emb["img"])
    ec = cfg.eval
    again = cross_modal_retrieval(emb["img"], emb["gene"], ks=ec.ks, seed=ec.seed,
                                  inbatch_size=ec.inbatch_size,
                                  inbatch_repeats=ec.inbatch_repeats)
    assert again["mean_rank_img2gene"] == pytest.approx(
        result.best_metrics["val/mean_rank_img2gene"], rel=1e-4)


def test_keeps_best_and_latest_checkpoints_only(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=40, eval_every=10, keep_checkpoints=1)
    result = fit(cfg, run_dir=tmp_path / "run", verbose=False)
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint"))
    expected = {result.best_checkpoint.name, "checkpoint_0000040"}
    assert set(kept) == expected


def test_training_brings_raw_logit_scale_back_into_range(make_cfg, tmp_path):
    """Issue 12 item 8, through the real loop: a raw temperature parameter above ln 100 (the
    forward clamp gives it zero gradient, so it used to stay there for good) is clamped back
    by the first optimiser step of a resumed run, and stays in [0, ln 100]."""
    cfg = make_cfg(max_steps=20, eval_every=10)
    fit(cfg, run_dir=tmp_path / "first", verbose=False)
    ckpt = tmp_path / "first" / "checkpoint_0000010"
    state = torch.load(ckpt / "model.pt", weights_only=True)
    state["logit_scale"] = torch.tensor(5.0)
    torch.save(state, ckpt / "model.pt")
    fit(cfg, run_dir=tmp_path / "resumed", resume_from=ckpt, verbose=False)
    scale = float(_weights(tmp_path / "resumed" / "checkpoint_0000020")["logit_scale"])
    assert 0.0 <= scale <= np.log(100.0) + 1e-6


def test_reports_carry_dense_learning_curve_points(make_cfg, tmp_path):
    """``train.log_every`` (default eval_every // 10) gives each report the window means at
    every log point since the last report, the report's own step last, so the dashboard's
    learning curves have more than one point per evaluation."""
    from hescape.train.validate import CURVE_KEY

    seen = []
    fit(make_cfg(max_steps=20, eval_every=10), run_dir=tmp_path / "default", verbose=False,
        report_callback=lambda m, c: seen.append(m))
    assert [[s for s, _ in m[CURVE_KEY]] for m in seen] == [list(range(1, 11)),
                                                            list(range(11, 21))]
    point = seen[0][CURVE_KEY][-1][1]
    assert set(point) >= {"train/loss", "train/contrastive", "train/temperature", "train/lr"}
    assert all(np.isfinite(v) for v in point.values())
    seen.clear()
    fit(make_cfg(max_steps=12, eval_every=6, log_every=4), run_dir=tmp_path / "every4",
        verbose=False, report_callback=lambda m, c: seen.append(m))
    assert [[s for s, _ in m[CURVE_KEY]] for m in seen] == [[4], [8, 12]]
