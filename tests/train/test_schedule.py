import math

import pytest

from hescape.train.schedule import get_lr


def test_warmup_is_linear_to_base_lr():
    lrs = [get_lr(s, base_lr=1.0, warmup_steps=4, max_steps=20) for s in range(4)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_decays_to_min_ratio_and_stays():
    kw = dict(base_lr=2.0, warmup_steps=5, max_steps=105, min_ratio=0.1)
    assert get_lr(5, **kw) == pytest.approx(2.0)
    assert get_lr(55, **kw) == pytest.approx(0.2 + 0.5 * 1.8)  # half way: cos = 0
    assert get_lr(105, **kw) == pytest.approx(0.2)
    assert get_lr(10_000, **kw) == pytest.approx(0.2)
    decay = [get_lr(s, **kw) for s in range(5, 106)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_no_warmup_starts_at_base_lr():
    assert get_lr(0, base_lr=1e-3, warmup_steps=0, max_steps=10) == pytest.approx(1e-3)
    assert math.isfinite(get_lr(0, base_lr=1.0, warmup_steps=0, max_steps=0))

