"""Per-trial resources, concurrency from cluster size, storage checks."""

from __future__ import annotations

import os

import pytest

from hescape.config import ConfigError, StudyConfig
from hescape.study.resources import (
    check_storage,
    max_concurrent_trials,
    trial_resources,
)
from hescape.train import runs_in_process


def _cfg(**train) -> StudyConfig:
    return StudyConfig.model_validate({"train": train})


def test_in_process_trial_reserves_one_worker_cpu():
    res = trial_resources(_cfg(num_workers=1, cpus_per_worker=1))
    assert res.in_process and res.total_cpu == 1
    assert max_concurrent_trials(res, {"CPU": 2.0}, None, "s") == 2
    assert max_concurrent_trials(res, {"CPU": 8.0}, 3, "s") == 3
    # an explicit cap above today's cluster stands: the extra trials wait for joining nodes
    assert max_concurrent_trials(res, {"CPU": 1.0}, 4, "s") == 4


def test_worker_group_trials_never_oversubscribe():
    res = trial_resources(_cfg(num_workers=2, cpus_per_worker=1, in_process=False))
    assert not res.in_process
    # two 2-worker trials on a 2-CPU machine would wait on each other forever: only one runs
    assert max_concurrent_trials(res, {"CPU": 2.0}, None, "s") == 1
    gpu = trial_resources(_cfg(num_workers=2, use_gpu=True, cpus_per_worker=2))
    assert not runs_in_process(_cfg(num_workers=2, use_gpu=True))
    assert max_concurrent_trials(gpu, {"CPU": 32.0, "GPU": 4.0}, None, "s") == 2


def test_impossible_resources_fail_with_the_numbers():
    res = trial_resources(_cfg(num_workers=4, cpus_per_worker=2, in_process=False))
    with pytest.raises(ConfigError) as err:
        max_concurrent_trials(res, {"CPU": 2.0}, None, "study.yaml")
    msg = str(err.value)
    assert "8 CPU" in msg and "2 CPU" in msg and "train.num_workers=4" in msg
    gpu = trial_resources(_cfg(use_gpu=True))
    with pytest.raises(ConfigError, match="GPU"):
        max_concurrent_trials(gpu, {"CPU": 4.0}, None, "s")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_storage_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ConfigError, match="not writable"):
        check_storage(ro / "runs")


def test_unwritable_storage_is_refused_even_as_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_storage(blocker / "runs")  # a path under a regular file cannot be created


def test_nearly_full_storage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="MiB free"):
        check_storage(tmp_path, min_free=10**18)


# ------------------------------------------------------------- packed head-only GPU trials
def _packed(**extra) -> StudyConfig:
    data = {"train": {"use_gpu": True, "gpus_per_trial": 0.25, "cpus_per_worker": 1},
            "model": {"image": {"mode": "frozen"}}}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        data.setdefault(section, {})
        if section == "sweep":
            data["sweep"] = value
        else:
            data[section].update(value if not field else {field: value})
    return StudyConfig.model_validate(data)


def test_head_only_trials_pack_on_a_gpu_share():
    res = trial_resources(_packed())
    assert res.trial == {"CPU": 1.0, "GPU": 0.25} and res.in_process
    assert (res.total_cpu, res.total_gpu) == (1.0, 0.25)
    assert runs_in_process(_packed())  # the loop runs in the trial actor, on its share
    assert max_concurrent_trials(res, {"CPU": 16.0, "GPU": 1.0}, None, "s") == 4
    assert max_concurrent_trials(res, {"CPU": 16.0, "GPU": 2.0}, None, "s") == 8
    assert max_concurrent_trials(res, {"CPU": 3.0, "GPU": 1.0}, None, "s") == 3  # CPU-bound
    assert max_concurrent_trials(res, {"CPU": 16.0, "GPU": 1.0}, 2, "s") == 2
    third = trial_resources(_packed(train={"use_gpu": True, "gpus_per_trial": 0.3}))
    assert max_concurrent_trials(third, {"CPU": 16.0, "GPU": 1.0}, None, "s") == 3
    with pytest.raises(ConfigError, match="0 GPU"):
        max_concurrent_trials(res, {"CPU": 16.0}, None, "s")


@pytest.mark.parametrize("extra, key", [
    ({"model": {"image": {"mode": "finetune"}}}, "model.image.mode can be 'finetune'"),
    ({"train": {"use_gpu": True, "gpus_per_trial": 0.5, "feature_cache": False}},
     "train.feature_cache can be False"),
    ({"preprocess": {"image": {"stain_augment": 0.05}}}, "stain_augment can be 0.05"),
    ({"sweep": {"params": {"model.image.mode": {"type": "choice",
                                                "values": ["frozen", "last_n"]}}}},
     "model.image.mode can be 'last_n'"),
    ({"sweep": {"params": {"preprocess.image.stain_augment": {
        "type": "uniform", "low": 0.0, "high": 0.1}}}}, "samples preprocess.image.stain_augment"),
])
def test_packing_refuses_trials_that_are_not_head_only(extra, key):
    with pytest.raises(ConfigError) as err:
        trial_resources(_packed(**extra))
    assert "train.gpus_per_trial=" in str(err.value) and key in str(err.value)
    assert "drop train.gpus_per_trial" in str(err.value) or "type: choice" in str(err.value)


def test_packing_needs_a_gpu_and_one_worker():
    with pytest.raises(ValueError, match="set use_gpu: true and num_workers: 1"):
        StudyConfig.model_validate({"train": {"gpus_per_trial": 0.25}})
    with pytest.raises(ValueError, match="num_workers=2"):
        StudyConfig.model_validate({"train": {"gpus_per_trial": 0.25, "use_gpu": True,
                                              "num_workers": 2}})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        StudyConfig.model_validate({"train": {"gpus_per_trial": 1.5, "use_gpu": True}})


def _packed_trial(config: dict) -> dict:
    """Announce itself, then wait until every packed trial has announced (they run at once)."""
    import time
    from pathlib import Path

    import ray
    from ray import tune

    marks = Path(config["dir"])
    (marks / f"trial-{config['i']}").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    deadline = time.monotonic() + 120
    while len(list(marks.glob("trial-*"))) < config["n"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the packed trials did not all run at the same time")
        time.sleep(0.2)
    tune.report({"gpu_ids": ",".join(map(str, ray.get_gpu_ids())), "together": 1})


def test_four_packed_trials_share_one_fake_gpu_in_tune(tmp_path):
    """Ray places 4 trials of 0.25 GPU on a 1-GPU local cluster (scheduling only: no GPU
    needed) and runs them at once; each sees GPU 0. Fails if any trial reserved a whole GPU
    (the others would wait and the first would time out)."""
    import sys

    ray = pytest.importorskip("ray")
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    res = trial_resources(_packed())
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        n = max_concurrent_trials(res, ray.cluster_resources(), None, "s")
        assert n == 4
        marks = tmp_path / "marks"
        marks.mkdir()
        tuner = tune.Tuner(
            tune.with_resources(_packed_trial, res.trial),
            param_space={"i": tune.grid_search(list(range(n))), "n": n, "dir": str(marks)},
            tune_config=tune.TuneConfig(max_concurrent_trials=n),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors, results.errors
    assert [r.metrics["together"] for r in results] == [1] * n
    assert {r.metrics["gpu_ids"] for r in results} == {"0"}
    assert {p.read_text() for p in marks.iterdir()} == {"0"}
