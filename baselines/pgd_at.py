"""PGD adversarial training (Madry et al., 2018), as in MadryLab/cifar10_challenge.

Algorithm, per minibatch (baselines_spec.md §2):
    δ ~ U(−ε, ε);  repeat k times: δ ← Π_ε(δ + α·sign ∇δ L(f(x+δ), y)), clamp x+δ to [0,1]
    θ ← θ − η ∇θ L(f(x+δ), y)        (adversarial loss only)

Reference recipe [MC]: WRN-32-10 (Madry's TF network), PGD-10 with α = 2/255 at ε = 8/255,
random start, the attack in train mode (BatchNorm batch statistics, running stats updated by
every attack forward), momentum SGD 0.9 without Nesterov, weight decay 2e-4 on conv/FC
weights only, batch 128, 80k steps with LR 0.1 → 0.01 → 0.001 at 50% / 75% of the run,
zero-padding-2 random crop + flip.

Deviations:
- 80,000 steps become 205 epochs of 390 steps (79,950 steps): epochs are the runner's unit.
- α defaults to ε/4 (= 2/255 at 8/255), so the step keeps its ratio to ε at other scales.
- BN momentum/eps follow the model registry's WRN-32-10 (TF decay 0.9 = momentum 0.1, eps 1e-3).
We follow Madry rather than Rice et al. because the paper's Table 1 row (87.25 / 45.84, 5418 min)
is Madry's model as quoted by the Free-AT paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from paper_repro.attacks import pgd
from paper_repro.methods import Context, Method, objective_epoch, register_method


@dataclass(frozen=True)
class PGDSettings:
    steps: int = 10               # k
    alpha: float | None = None    # step size in pixels; None: ε/4 (2/255 at ε = 8/255)
    bn_mode: str = "train"        # model mode while the attack runs ("train" as Madry, or "eval")
    random_start: bool = True

    def __post_init__(self) -> None:
        from paper_repro.errors import ConfigError
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


@register_method
class PGDAT(Method):
    name = "pgd_at"
    Settings = PGDSettings
    recipe = dict(
        arch="wrn-32-10", epochs=205, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
        nesterov=False, weight_decay=2e-4, wd_scope="weights", schedule="piecewise",
        schedule_args={"milestones": [0.5, 0.75], "gamma": 0.1},
        augment_pad=2, augment_pad_mode="zeros", augment_flip=True,
    )

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        return adversarial_epoch(ctx, self.settings)
