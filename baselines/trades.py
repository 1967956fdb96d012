"""TRADES (Zhang et al., ICML 2019), as in yaodongyu/TRADES (trades.py, train_trades_cifar10.py).

Algorithm, per minibatch:
    model.eval();  p = softmax(f(x))
    δ ← 0.001·N(0, 1);  repeat k times: δ ← Π_ε(δ + α·sign ∇δ KL(p ‖ f(x+δ))), clamp x+δ to [0,1]
    model.train(); θ ← θ − η ∇θ [ CE(f(x), y) + β · KL(f(x) ‖ f(x+δ)) ]   (KL summed / batch)
The attack is the shared PGD with TRADES's objective (`attacks.per_example_kl`) and start
(`attacks.gaussian_start`); the loss lets gradients flow through both f(x) and f(x_adv).

Reference recipe (the CIFAR-10 script at yaodongyu/TRADES HEAD): WRN-34-10, β = 6, PGD-10 on
the KL with step 0.007 at ε = 0.031 in eval mode, SGD lr 0.1, momentum 0.9, weight decay 2e-4
on all parameters, batch 128 (last partial batch kept), 76 epochs with LR × 0.1 from 1-indexed
epoch 75 (the later drops at 90 and 100 lie beyond the run), zero-padding-4 random crop + flip.

Deviations:
- ε is the table's (8/255 at paper scale), not 0.031; the step keeps its ratio 0.007/0.031 to ε.
- The shared PGD projects the 0.001·N(0,1) start onto the ε-ball and [0,1] before the first
  gradient; the reference takes the first gradient at the unclamped start.
- p = softmax(f(x)) is computed once per attack (no gradient); the reference recomputes it at
  every step, which in eval mode gives the same numbers.
- The update runs f(x) once and uses it for both CE and the KL's target; the reference runs it
  twice (same outputs in train mode, but its BatchNorm running statistics move twice).
- The network is the registry's WRN-34-10 (Rice's wiring), without the reference copy's unused
  `sub_block1` parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from paper_repro.robustness.attacks import gaussian_start, per_example_kl, pgd
from paper_repro.errors import ConfigError
from paper_repro.training.methods import Context, Method, objective_epoch, register_method

REFERENCE_ALPHA_FACTOR = 0.007 / 0.031  # step 0.007 at ε = 0.031


@dataclass(frozen=True)
class TRADESSettings:
    beta: float = 6.0                           # β = 1/λ, the README's WRN-34-10 value
    steps: int = 10                             # k
    alpha_factor: float = REFERENCE_ALPHA_FACTOR  # α = alpha_factor · ε

    def __post_init__(self) -> None:
        check_objective(self.beta, self.steps, self.alpha_factor)


def check_objective(beta: float, steps: int, alpha_factor: float) -> None:
    """The checks TRADES's and MART's settings share."""
    if beta < 0:
        raise ConfigError(f"beta must be >= 0, got {beta}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if alpha_factor <= 0:
        raise ConfigError(f"alpha_factor must be > 0, got {alpha_factor}")


def trades_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> torch.Tensor:
    """CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)), the KL summed over classes, averaged over the batch."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1),
                  reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * kl


def kl_attack(model: nn.Module, x: torch.Tensor, eps: float, alpha: float,
              steps: int) -> torch.Tensor:
    """TRADES's inner maximisation: PGD on KL(f(x) ‖ f(x_adv)) from x + 0.001·N(0,1), eval mode."""
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    return pgd(model, x, p_clean, eps=eps, alpha=alpha, steps=steps, delta=gaussian_start(x),
               loss_fn=per_example_kl)


@dataclass(frozen=True)
class TRADESObjective:
    beta: float
    steps: int
    alpha_factor: float

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps: float) -> torch.Tensor:
        return kl_attack(model, x, eps, self.alpha_factor * eps, self.steps)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, logits_adv = model(x), model(x_adv)
        return trades_loss(logits, logits_adv, y, self.beta), logits_adv


@register_method
class TRADES(Method):
    name = "trades"
    marker = "X"  # its symbol in the Pareto figures
    Settings = TRADESSettings
    recipe = dict(
        arch="wrn-34-10", epochs=76, batch_size=128, drop_last=False, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=False, weight_decay=2e-4, wd_scope="all", schedule="multistep",
        schedule_args={"milestones": [74 / 76], "gamma": 0.1},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
    )

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        s = self.settings
        return objective_epoch(ctx, TRADESObjective(s.beta, s.steps, s.alpha_factor))
