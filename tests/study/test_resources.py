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
