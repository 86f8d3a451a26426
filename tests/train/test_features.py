"""Frozen-encoder feature cache: equals re-encoding, computed once under concurrency."""

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hescape.data import load_paired
from hescape.train import features as features_mod
from hescape.train import fit
from hescape.train.checkpoint import load_checkpoint
from hescape.train.dataset import images_to_input
from hescape.train.features import cached_features, frozen_image_encoder, use_feature_cache


def test_cached_features_equal_the_encoder_on_preprocessed_patches(make_cfg, tiny_data):
    cfg = make_cfg()
    paired = load_paired(tiny_data)
    path = cached_features(cfg, paired, progress=False)
    assert path.parent == Path(cfg.storage_dir).resolve() / "cache" / "features"
    feats = np.load(path)
    enc = frozen_image_encoder(cfg).eval()
    rows = np.arange(0, len(feats), 37)
    with torch.no_grad():
        direct = enc(images_to_input(paired.patches[rows], enc)).numpy()
    np.testing.assert_allclose(feats[rows], direct, rtol=1e-5, atol=1e-6)
    assert cached_features(cfg, paired, progress=False) == path  # second call: a cache hit


def test_training_on_cached_features_matches_re_encoding(make_cfg, tmp_path):
    cached_cfg = make_cfg(max_steps=30, eval_every=15)
    reencode_cfg = make_cfg(max_steps=30, eval_every=15, feature_cache=False)
    assert use_feature_cache(cached_cfg) and not use_feature_cache(reencode_cfg)
    a = fit(cached_cfg, run_dir=tmp_path / "cached", verbose=False)
    b = fit(reencode_cfg, run_dir=tmp_path / "reencode", verbose=False)
    for key in ("train/loss", "val/loss", "val/mean_rank_img2gene", "val/r10_img2gene"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-3, abs=1e-4), key
    wa = load_checkpoint(a.best_checkpoint, with_train_state=False).model_state
    wb = load_checkpoint(b.best_checkpoint, with_train_state=False).model_state
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)


def test_stain_augmentation_turns_the_cache_off(make_cfg):
    cfg = make_cfg(extra={"preprocess": {"image": {"stain_augment": 0.05}}})
    assert not use_feature_cache(cfg)


def _slow_encode(*args, **kwargs):
    with open(kwargs.pop("_log"), "a") as fh:
        fh.write("computed\n")
    time.sleep(1.0)
    return _ORIGINAL(*args, **kwargs)


_ORIGINAL = features_mod.encode_patches


def _worker(cfg_json, data, log, out):
    from hescape.config import StudyConfig

    features_mod.encode_patches = lambda *a, **k: _slow_encode(*a, _log=log, **k)
    path = cached_features(StudyConfig.model_validate_json(cfg_json), load_paired(data),
                           progress=False)
    out.put(str(path))


def test_two_concurrent_requests_compute_once(make_cfg, tiny_data, tmp_path):
    cfg = make_cfg()
    log = tmp_path / "computed.log"
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg.model_dump_json(), str(tiny_data), str(log),
                                               out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    paths = {out.get(timeout=5), out.get(timeout=5)}
    assert len(paths) == 1
    assert log.read_text().count("computed") == 1
    cache_dir = Path(paths.pop()).parent
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp files


def test_evaluation_reuses_the_feature_cache_with_identical_metrics(make_cfg, tmp_path,
                                                                     monkeypatch):
    """A frozen-backbone trial's evaluation reads the study's feature cache (no patch is
    encoded, baseline included) and gives the metrics that re-encoding gives."""
    from hescape.evaluate.checkpoint_eval import evaluate_checkpoint

    cfg = make_cfg(max_steps=10, eval_every=10)
    result = fit(cfg, run_dir=tmp_path / "run", verbose=False)
    overrides = ["plots=false", "inbatch_repeats=2", "baselines=true"]
    calls = []
    real_encode = features_mod.encode_patches
    monkeypatch.setattr(features_mod, "encode_patches",
                        lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    data = cfg.data.path
    cached, _ = evaluate_checkpoint(result.best_checkpoint, data, out_dir=tmp_path / "e1",
                                    eval_overrides=overrides, progress=False)
    assert calls == []  # nothing re-encoded
    feats = Path(load_checkpoint(result.best_checkpoint, with_train_state=False)
                 .meta["features_path"])
    feats.rename(feats.with_name("moved.npy"))  # no cache: encode the patches
    encoded, _ = evaluate_checkpoint(result.best_checkpoint, data, out_dir=tmp_path / "e2",
                                     eval_overrides=overrides, progress=False)
    assert calls == [1]  # the frozen baseline re-encoded the patches
    assert any(k.startswith("test/baseline") or "frozen" in k for k in cached), sorted(cached)
    assert cached.keys() == encoded.keys()
    for key, value in encoded.items():
        assert cached[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc needed")
def test_feature_cache_streams_the_patch_store_through_the_file(make_cfg, tmp_path):
    """Encoding every patch maps none of the store into the process (its pages would count
    in RSS: GiBs at 200k spots); the result equals slicing the memmap."""
    from hescape.data import tiny_dataset

    data = tiny_dataset(tmp_path / "d", seed=1, spots_per_donor=300, patch_size=32)
    paired = load_paired(data)
    store = (data / "patches.npy").resolve()
    assert _mapped_rss_kib(store) == 0
    cfg = make_cfg(data=data)
    path = cached_features(cfg, paired, progress=False, batch_size=64)
    assert _mapped_rss_kib(store) == 0  # memmap slicing would have left ~900 KiB resident
    enc = frozen_image_encoder(cfg).eval()
    with torch.no_grad():
        direct = enc(images_to_input(np.asarray(paired.patches[-70:]), enc)).numpy()
    np.testing.assert_allclose(np.load(path)[-70:], direct, rtol=1e-5, atol=1e-6)


def test_row_io_matches_slicing_and_refuses_partial_blocks(tmp_path):
    from hescape.data.rowio import NpyRowWriter, read_rows

    arr = np.arange(7 * 3 * 2, dtype=np.int16).reshape(7, 3, 2)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    for start, stop in ((0, 3), (3, 7), (5, 99), (6, 7)):
        np.testing.assert_array_equal(read_rows(mm, start, stop), arr[start:stop])
        np.testing.assert_array_equal(read_rows(arr, start, stop), arr[start:stop])
    np.testing.assert_array_equal(read_rows(mm[2:], 0, 2), arr[2:4])  # a view: sliced
    with NpyRowWriter(tmp_path / "b.npy", (7, 3, 2), np.int16) as out:
        out[0:4] = arr[:4]
        out[4:7] = arr[4:]
        with pytest.raises(ValueError, match="does not fill rows 0:2"):
            out[0:2] = arr[:3]
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), arr)


def test_float16_cache_is_half_the_size_and_trains_to_the_same_retrieval(make_cfg, tiny_data,
                                                                         tmp_path):
    """train.feature_dtype=float16: its own cache entry, half the bytes, rows within float16
    rounding of the float32 cache, and a trial reaches the same validation retrieval
    (R@k within 0.02, mean rank within 2%)."""
    full = make_cfg(max_steps=30, eval_every=15)
    half = make_cfg(max_steps=30, eval_every=15, feature_dtype="float16")
    paired = load_paired(tiny_data)
    p32, p16 = (cached_features(c, paired, progress=False) for c in (full, half))
    assert p32 != p16
    f32, f16 = np.load(p32), np.load(p16)
    assert f16.dtype == np.float16 and f16.nbytes * 2 == f32.nbytes
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=1e-3, atol=1e-3)
    a = fit(full, run_dir=tmp_path / "f32", verbose=False).metrics
    b = fit(half, run_dir=tmp_path / "f16", verbose=False).metrics
    for key in ("val/r5_img2gene", "val/r10_img2gene", "val/r10_gene2img"):
        assert abs(a[key] - b[key]) <= 0.02, (key, a[key], b[key])
    assert b["val/mean_rank_img2gene"] == pytest.approx(a["val/mean_rank_img2gene"], rel=0.02)
