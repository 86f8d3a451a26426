"""Ctrl-C / SIGTERM always stop the study driver, even when the first KeyboardInterrupt is
swallowed (raised inside a finaliser, as a Ray ObjectRef's __dealloc__ in Tune's loop)."""

from __future__ import annotations

import os
import signal

import pytest

from hescape.study import driver
from hescape.study.callbacks import INTERRUPTED, Interrupted


class _SignalsInFinaliser:
    """Sends SIGINT to this process from its __del__: the handler runs inside the finaliser,
    where Python reports the exception as unraisable and carries on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # bytecode boundaries: the pending handler runs here
            pass


@pytest.fixture(autouse=True)
def _sigint_default():
    """SIGINT at its default whatever earlier tests left (Ray can leave it ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_a_sigint_ignored_at_start_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous = driver._install_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        driver._restore_signal_handlers(previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_swallowed_interrupt_is_raised_again_at_the_next_tune_step(signum):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = driver._install_signal_handlers()
    try:
        assert not INTERRUPTED.is_set()
        Interrupted().on_step_begin(iteration=0, trials=[])  # nothing received: no-op
        if signum == signal.SIGINT:
            obj = _SignalsInFinaliser()
            del obj  # the KeyboardInterrupt dies inside __del__
        else:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
                for _ in range(10_000):
                    pass
        assert INTERRUPTED.is_set()
        with pytest.raises(KeyboardInterrupt):
            Interrupted().on_step_begin(iteration=1, trials=[])
    finally:
        driver._restore_signal_handlers(previous)
        INTERRUPTED.clear()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored
