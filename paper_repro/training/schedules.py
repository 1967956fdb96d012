"""Learning-rate schedules as pure functions of training progress, evaluated every iteration.

Progress `t` is measured in epochs of optimiser steps: t = step / steps_per_epoch, taken at the
start of each step (so t runs over [0, epochs)). Free AT's replays are optimiser steps too, so
its schedule counts them. Milestones are *fractions of the run*, so the same schedule keeps its
shape at every scale (a drop "at 50%" is epoch 100 of 200 and epoch 10 of 20).

A schedule may also drive momentum (PyTorch's CyclicLR cycles it inversely to the LR).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import ConfigError

_EPS = 1e-9  # tolerance so that a milestone at 30/37 of 37 epochs lands exactly on epoch 30


@dataclass(frozen=True)
class Schedule:
    """lr(t) and optionally momentum(t), t in epochs (fractional)."""

    lr: Callable[[float], float]
    momentum: Callable[[float], float] | None = None


def constant(*, base_lr: float, epochs: float) -> Schedule:
    return Schedule(lambda t: base_lr)


def piecewise(*, base_lr: float, epochs: float, milestones: Sequence[float] = (0.5, 0.75),
              gamma: float = 0.1) -> Schedule:
    """LR × gamma at each milestone (fractions of the run): Madry/Rice 0.1 → 0.01 → 0.001 at 50%/75%.

    Also serves as `multistep`: WRN's ×0.2 at epochs 60/120/160 of 200 is milestones 0.3/0.6/0.8.
    """
    bounds = sorted(m * epochs for m in milestones)

    def lr(t: float) -> float:
        drops = sum(1 for b in bounds if t >= b - _EPS)
        return base_lr * gamma ** drops

    return Schedule(lr)


def multistep(*, base_lr: float, epochs: float, milestones: Sequence[float],
              gamma: float = 0.1, per_epoch: bool = True) -> Schedule:
    """PyTorch MultiStepLR stepped once per epoch (YOPO, ATTA): the LR changes only at epoch starts."""
    inner = piecewise(base_lr=base_lr, epochs=epochs, milestones=milestones, gamma=gamma)
    if not per_epoch:
        return inner
    return Schedule(lambda t: inner.lr(math.floor(t + _EPS)))


def step_lr(*, base_lr: float, epochs: float, plateau: float, gamma: float = 0.5) -> Schedule:
    """The paper's step-LR(i, γ): LR × γ after every plateau of i epochs (Fig 4)."""
    if plateau <= 0:
        raise ConfigError(f"step_lr: plateau must be > 0 epochs, got {plateau}")
    return Schedule(lambda t: base_lr * gamma ** math.floor(t / plateau + _EPS))


def linear(*, base_lr: float, epochs: float, knots: Sequence[Sequence[float]]) -> Schedule:
    """Piecewise-linear LR through (fraction of the run, LR factor) knots, per iteration: Fast AT's
    ImageNet schedule (0 → 0.4 over epoch 1, → 0.04 by 6, → 0.004 by 12, → 0.0004 by 15)."""
    points = sorted((float(f) * epochs, float(v)) for f, v in knots)
    if len(points) < 2:
        raise ConfigError("linear: knots needs at least two [fraction, factor] pairs")

    def lr(t: float) -> float:
        for (t0, v0), (t1, v1) in zip(points, points[1:]):
            if t <= t1:
                w = 0.0 if t1 == t0 else min(max((t - t0) / (t1 - t0), 0.0), 1.0)
                return base_lr * (v0 + w * (v1 - v0))
        return base_lr * points[-1][1]

    return Schedule(lr)


def cyclic(*, base_lr: float, epochs: float, min_lr: float = 0.0, up_fraction: float = 0.5,
           base_momentum: float = 0.8, max_momentum: float = 0.9,
           cycle_momentum: bool = True) -> Schedule:
    """Triangular one-cycle: min_lr → base_lr (peak) → min_lr, per iteration (Fast AT: 0 → 0.2 → 0).

    Like PyTorch's CyclicLR (cycle_momentum=True by default), momentum moves inversely to the LR:
    max_momentum at the LR minimum, base_momentum at the LR peak.
    """
    t_up = up_fraction * epochs
    t_down = epochs - t_up

    def height(t: float) -> float:  # 0 at the ends, 1 at the peak
        if t <= t_up:
            return t / t_up if t_up > 0 else 1.0
        return max(0.0, (epochs - t) / t_down) if t_down > 0 else 0.0

    def lr(t: float) -> float:
        return min_lr + (base_lr - min_lr) * height(t)

    def momentum(t: float) -> float:
        return max_momentum - (max_momentum - base_momentum) * height(t)

    return Schedule(lr, momentum if cycle_momentum else None)


def slow_start_fast_decay(*, base_lr: float, epochs: float, start_factor: float = 0.05,
                          peak_at: float = 0.3, end_factor: float = 0.01) -> Schedule:
    """AFT's 'slow start, fast decay' (the paper's Fig 5; its exact formula is not published).

    Rise: a half-cosine from base_lr·start_factor to the peak base_lr over the first `peak_at`
    of the run (slow start: the fine-tune first learns the adversarial distribution gently).
    Decay: exponential from the peak to base_lr·end_factor at the end (fast decay: the LR falls
    by most of its value within a couple of epochs, leaving no long plateau to over-fit on).
    """
    if not 0 < peak_at < 1:
        raise ConfigError(f"slow_start_fast_decay: peak_at must be in (0, 1), got {peak_at}")
    t_peak = peak_at * epochs
    lr_start, lr_end = base_lr * start_factor, base_lr * end_factor

    def lr(t: float) -> float:
        if t < t_peak:
            return lr_start + (base_lr - lr_start) * (1 - math.cos(math.pi * t / t_peak)) / 2
        progress = min(1.0, (t - t_peak) / (epochs - t_peak))
        return base_lr * (lr_end / base_lr) ** progress

    return Schedule(lr)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "piecewise": piecewise,
    "multistep": multistep,
    "step_lr": step_lr,
    "cyclic": cyclic,
    "linear": linear,
    "slow_start_fast_decay": slow_start_fast_decay,
}


def make_schedule(name: str, *, base_lr: float, epochs: float, **kwargs) -> Schedule:
    """Look a schedule up by name; unknown names and arguments fail with one clear line."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{name}' (valid: {', '.join(sorted(SCHEDULES))})")
    try:
        schedule = SCHEDULES[name](base_lr=base_lr, epochs=epochs, **kwargs)
        # evaluate it once now: a bad argument (gamma = "abc") must fail here, not mid-run
        for t in (0.0, epochs / 2, max(epochs - 1e-6, 0.0)):
            values = [schedule.lr(t)] + ([schedule.momentum(t)] if schedule.momentum else [])
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"it gives {values} at epoch {t:g}")
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ConfigError(f"schedule '{name}': bad arguments {sorted(kwargs)} "
                          f"({' '.join(str(e).split())})") from None
    return schedule
