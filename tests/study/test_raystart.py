"""Local Ray start-up: a transient start-up timeout is retried, other errors are not."""

from __future__ import annotations

import pytest
import ray

from hescape import raystart


class FlakyInit:
    """Fails like Ray's 30 s raylet wait ``fails`` times, then starts a real local Ray."""

    def __init__(self, fails: int, message: str) -> None:
        self.fails, self.message, self.calls = fails, message, 0
        self.real = ray.init

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.fails:
            raise Exception(self.message)
        return self.real(*args, num_cpus=1, **kwargs)


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.shutdown()
    yield
    ray.shutdown()


def test_startup_timeout_is_retried_then_ray_runs(monkeypatch, no_ray):
    flaky = FlakyInit(1, "The current node timed out during startup. This could happen ...")
    monkeypatch.setattr(ray, "init", flaky)
    raystart.init_ray(None, log_to_driver=False, backoff_s=0.0)
    assert flaky.calls == 2 and ray.is_initialized()
    assert ray.get(ray.put(7)) == 7


def test_gives_up_with_advice_after_attempts(monkeypatch, no_ray):
    flaky = FlakyInit(5, "The current node timed out during startup.")
    monkeypatch.setattr(ray, "init", flaky)
    with pytest.raises(RuntimeError, match="did not start in 2 attempts.*ray start --head"):
        raystart.init_ray(None, attempts=2, backoff_s=0.0)
    assert flaky.calls == 2 and not ray.is_initialized()


def test_other_errors_are_not_retried(monkeypatch, no_ray):
    flaky = FlakyInit(5, "permission denied: /tmp/ray")
    monkeypatch.setattr(ray, "init", flaky)
    with pytest.raises(Exception, match="permission denied"):
        raystart.init_ray(None, backoff_s=0.0)
    assert flaky.calls == 1
