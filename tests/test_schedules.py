"""schedules.py: the shapes the methods and figures rely on."""
from __future__ import annotations

import math

import pytest

from paper_repro.errors import ConfigError
from paper_repro.training.schedules import make_schedule


def _trace(schedule, epochs, steps_per_epoch=10):
    return [schedule.lr(i / steps_per_epoch) for i in range(epochs * steps_per_epoch)]


def test_slow_start_fast_decay_shape():
    s = make_schedule("slow_start_fast_decay", base_lr=1e-3, epochs=10, start_factor=0.05,
                      peak_at=0.3, end_factor=0.01)
    lr = _trace(s, 10)
    peak = max(range(len(lr)), key=lr.__getitem__)
    assert lr[0] == pytest.approx(5e-5)                       # slow start: small
    assert 28 <= peak <= 30 and max(lr) == pytest.approx(1e-3, rel=1e-2)
    assert all(b >= a for a, b in zip(lr[:peak], lr[1:peak + 1]))   # smooth monotone rise
    assert all(b <= a for a, b in zip(lr[peak:], lr[peak + 1:]))    # monotone decay
    assert lr[-1] == pytest.approx(1e-5, rel=0.1)             # near zero at the end
    # fast decay: half of the peak is lost within ~1.1 epochs of it (exponential)
    half = next(i for i in range(peak, len(lr)) if lr[i] <= 5e-4)
    assert (half - peak) / 10 < 1.2
    # the rise is smooth: no step is larger than 10% of the peak
    assert max(abs(b - a) for a, b in zip(lr, lr[1:])) < 1e-4


def test_piecewise_drops_at_fractions():
    s = make_schedule("piecewise", base_lr=0.1, epochs=200, milestones=[0.5, 0.75])
    assert s.lr(99.99) == pytest.approx(0.1)
    assert s.lr(100.0) == pytest.approx(0.01)
    assert s.lr(150.0) == pytest.approx(0.001)


def test_multistep_changes_only_at_epoch_starts():
    s = make_schedule("multistep", base_lr=0.08, epochs=37, milestones=[30 / 37, 34 / 37, 36 / 37])
    assert s.lr(29.99) == pytest.approx(0.08)
    assert s.lr(30.0) == pytest.approx(0.008)   # 30/37*37 must not miss epoch 30 by rounding
    assert s.lr(34.5) == pytest.approx(0.0008)
    assert s.lr(36.0) == pytest.approx(0.00008)


def test_step_lr_plateaus():
    s = make_schedule("step_lr", base_lr=1e-3, epochs=10, plateau=2, gamma=0.5)
    assert [s.lr(e) for e in (0, 1.9, 2, 4, 9.5)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 6.25e-5])
    with pytest.raises(ConfigError):
        make_schedule("step_lr", base_lr=1e-3, epochs=10, plateau=0)


def test_cyclic_lr_and_inverse_momentum():
    s = make_schedule("cyclic", base_lr=0.2, epochs=15, base_momentum=0.8, max_momentum=0.9)
    assert s.lr(0) == 0.0 and s.lr(7.5) == pytest.approx(0.2) and s.lr(15) == pytest.approx(0.0)
    assert s.lr(3.75) == pytest.approx(0.1)
    assert s.momentum(0) == pytest.approx(0.9)
    assert s.momentum(7.5) == pytest.approx(0.8)     # LR peak: momentum lowest
    assert s.momentum(15) == pytest.approx(0.9)
    assert s.momentum(3.75) == pytest.approx(0.85)


def test_unknown_schedule_and_bad_arguments_are_clear():
    with pytest.raises(ConfigError, match="valid: .*slow_start_fast_decay"):
        make_schedule("cosine-ish", base_lr=0.1, epochs=1)
    with pytest.raises(ConfigError, match="bad arguments"):
        make_schedule("piecewise", base_lr=0.1, epochs=1, milestone=[0.5])
    with pytest.raises(ConfigError):
        make_schedule("slow_start_fast_decay", base_lr=0.1, epochs=1, peak_at=1.5)
    assert math.isfinite(make_schedule("constant", base_lr=0.1, epochs=1).lr(0.3))


def test_linear_schedule_interpolates_fast_at_imagenet_knots():
    """Fast AT ImageNet: 0 -> 0.4 over epoch 1 of 15, -> 0.04 at epoch 6, per iteration."""
    s = make_schedule("linear", base_lr=0.4, epochs=15,
                      knots=[[0, 0], [1 / 15, 1], [6 / 15, 0.1], [12 / 15, 0.01], [1, 0.001]])
    assert s.lr(0) == 0
    assert s.lr(0.5) == pytest.approx(0.2)
    assert s.lr(1) == pytest.approx(0.4)
    assert s.lr(3.5) == pytest.approx(0.4 + (0.04 - 0.4) * 2.5 / 5)
    assert s.lr(15) == pytest.approx(0.0004)
    with pytest.raises(ConfigError):
        make_schedule("linear", base_lr=0.1, epochs=1, knots=[[0, 1]])
