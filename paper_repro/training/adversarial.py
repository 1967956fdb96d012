"""PGD-k adversarial training's step (Madry et al., 2018), shared: the `pgd_at` method
(baselines/pgd_at.py), AFT's fine-tune and AWP's inner objective train with it, and `bench`
times it against its reference loop. In core, not in a plug-in, because core's benchmark uses it
and plug-ins may import core but never the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..robustness.attacks import pgd
from .methods import Context, objective_epoch


@dataclass(frozen=True)
class PGDSettings:
    steps: int = 10               # k
    alpha: float | None = None    # step size in pixels; None: ε/4 (2/255 at ε = 8/255)
    bn_mode: str = "train"        # model mode while the attack runs ("train" as Madry, or "eval")
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.bn_mode not in ("train", "eval"):
            raise ConfigError(f"bn_mode must be 'train' or 'eval', got '{self.bn_mode}'")


@dataclass
class PGDObjective:
    """PGD AT's objective: PGD-k on the cross-entropy in the settings' model mode, then the
    cross-entropy of x_adv alone. `attack_fn` replaces `pgd` (the benchmark's reference loop)."""

    settings: PGDSettings
    attack_fn: Callable[..., torch.Tensor] | None = None  # None: this module's `pgd`

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps: float) -> torch.Tensor:
        s = self.settings
        model.train(s.bn_mode == "train")
        return (self.attack_fn or pgd)(model, x, y, eps=eps, steps=s.steps,
                                       alpha=eps / 4 if s.alpha is None else s.alpha,
                                       random_start=s.random_start)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits


def adversarial_epoch(ctx: Context, settings: PGDSettings,
                      attack: Callable[..., torch.Tensor] | None = None) -> dict[str, float]:
    """One epoch of PGD-k adversarial training; shared by `pgd_at` and AFT (and by the
    benchmark's reference-loop baseline, which passes its own `attack`; default attacks.pgd)."""
    return objective_epoch(ctx, PGDObjective(settings, attack))
