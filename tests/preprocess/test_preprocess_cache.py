"""prepare(): cached per (fingerprint, variant options, split), atomic, computed once."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hescape.preprocess.cache as cache
from hescape.config import ExpressionPreprocess
from hescape.data import load_paired, tiny_dataset
from hescape.preprocess import prepare, variant_key


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    return load_paired(tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds"))


def _counting(monkeypatch, log: Path | None = None, delay: float = 0.0):
    calls = []
    real = cache.apply_expression_variant

    def counted(*args, **kwargs):
        calls.append(1)
        if log is not None:
            with open(log, "a") as fh:
                fh.write("x\n")
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "apply_expression_variant", counted)
    return calls


def test_prepare_caches_and_reloads(paired, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    cfg = ExpressionPreprocess(method="pca", pca={"n_pcs": 5})
    first = prepare(paired, cfg, batch_key="donor", cache_dir=tmp_path, progress=False)
    second = prepare(paired, cfg, batch_key="donor", cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.X, second.X)
    assert second.cache_key == first.cache_key and second.feature_names == first.feature_names
    assert second.saw_heldout is False and second.info["n_train_rows"] == first.info["n_train_rows"]
    assert first.info["n_train_rows"] == int((paired.part_of() == "train").sum())
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_key_depends_on_relevant_options_only(paired):
    split = paired.split
    key = variant_key(paired.fingerprint, ExpressionPreprocess(method="pca"), split, batch_key="donor")
    # other methods' options (scVI's, Harmony's n_pcs) do not change a PCA result ...
    for same in [ExpressionPreprocess(method="pca", scvi={"max_epochs": 3}),
                 ExpressionPreprocess(method="pca", harmony={"n_pcs": 5})]:
        assert variant_key(paired.fingerprint, same, split, batch_key="donor") == key
    # ... while n_pcs, the split, the batch key and the data do
    for other in [
        variant_key(paired.fingerprint, ExpressionPreprocess(method="pca", pca={"n_pcs": 5}), split, batch_key="donor"),
        variant_key(paired.fingerprint, ExpressionPreprocess(method="pca"), {**split, "train": split["train"][:1]}, batch_key="donor"),
        variant_key(paired.fingerprint, ExpressionPreprocess(method="pca"), split, batch_key="slide"),
        variant_key("other-data", ExpressionPreprocess(method="pca"), split, batch_key="donor"),
    ]:
        assert other != key


def test_corrupt_entry_is_recomputed(paired, tmp_path, monkeypatch):
    cfg = ExpressionPreprocess()
    out = prepare(paired, cfg, batch_key="donor", cache_dir=tmp_path, progress=False)
    npz = next(tmp_path.glob("*.npz"))
    npz.write_bytes(b"garbage")
    calls = _counting(monkeypatch)
    again = prepare(paired, cfg, batch_key="donor", cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(out.X, again.X)


def test_concurrent_threads_compute_once(paired, tmp_path, monkeypatch):
    calls = _counting(monkeypatch, delay=0.5)
    cfg = ExpressionPreprocess(method="pca", pca={"n_pcs": 4})
    results = []

    def work():
        results.append(prepare(paired, cfg, batch_key="donor", cache_dir=tmp_path, progress=False))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    for r in results[1:]:
        np.testing.assert_array_equal(r.X, results[0].X)


def _child(path: str, cache_dir: str, log: str) -> None:
    import pytest as _pytest

    mp_ = _pytest.MonkeyPatch()
    _counting(mp_, log=Path(log), delay=0.5)
    paired = load_paired(path)
    prepare(paired, ExpressionPreprocess(method="pca", pca={"n_pcs": 3}), batch_key="donor",
            cache_dir=cache_dir, progress=False)


def test_concurrent_processes_compute_once(paired, tmp_path):
    log = tmp_path / "calls.log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_child, args=(str(paired.path), str(tmp_path / "c"), str(log)))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().count("x") == 1
