"""Adversarial Weight Perturbation (Wu et al., NeurIPS 2020), as in csdongxian/AWP
(AT_AWP/utils_awp.py + train_cifar10.py; trades_AWP/utils_awp.py + train_trades_cifar.py).

AWP wraps another method's objective; it is not a method of its own. Per minibatch, after the
inner method has crafted x_adv and once the warm-up epochs are over:
    proxy ← a copy of θ (train mode);  g_l ← ∇_{w_l} L_inner(proxy; x, x_adv, y)   (ascent)
    v_l ← γ · ‖w_l‖ / ‖g_l‖ · g_l    for every conv/linear weight w_l (BN and biases excluded)
    θ ← θ + v;   backward of L_inner(θ + v);   θ ← θ − v (bit-identical);   optimiser step
Two registry entries share this one wrapper: `at_awp` (PGD AT's objective) and `trades_awp`
(TRADES's); AFT uses it too (`method_args.awp`).

Reference recipes:
- AT-AWP (AT_AWP/train_cifar10.py, Rice et al.'s loop; the README's CIFAR-10 entry and logs
  use WRN-34-10): γ = 0.01, no warm-up, PGD-10 with α = 2/255 at ε = 8/255 in train mode, SGD lr
  0.1, momentum 0.9, weight decay 5e-4 on all parameters, batch 128 (last partial batch kept),
  200 epochs, piecewise LR 0.1/0.01/0.001 at 50%/75% stepped every iteration, reflect-padding-4
  random crop + flip.
- TRADES-AWP (trades_AWP/train_trades_cifar.py): γ = 5e-3, AWP from 1-indexed epoch 10 (9
  warm-up epochs), TRADES β = 6 with PGD-10 on the KL with α = 2/255 at ε = 8/255, WRN-34-10,
  SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128 (last partial batch kept), 200 epochs
  with LR × 0.1 at 1-indexed epoch 100 and × 0.01 at 150, zero-padding-4 random crop + flip.

Deviations:
- The direction is the proxy's gradient itself; the reference takes one SGD step on the proxy
  (no momentum, no weight decay) and uses the difference, which is that gradient times the
  proxy's LR, and the LR cancels in the normalisation (up to rounding).
- The perturbation is removed before the optimiser step by copying the saved weights back
  (bit-identical); the reference steps the perturbed weights, then subtracts v. The two differ
  by weight decay's share of v (lr · wd · v) and by float rounding.
- AT-AWP's attack always runs in train mode; the reference's first minibatch of each epoch
  after the first is attacked in eval mode (its model is left in eval mode by the epoch's
  evaluation until the first `model.train()`).
- With data parallelism each rank finds v on its own slice of the batch (the reference's
  DataParallel on the whole batch).
- The proxy is the model's own function evaluated at copies of its weights and buffers
  (`torch.func.functional_call`), not a second network loaded from its state dict: the same
  numbers, and BatchNorm statistics of the proxy pass are discarded as the reference's are. It
  runs eagerly, also when the model is compiled.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from paper_repro.training.adversarial import PGDObjective, PGDSettings
from baselines.trades import TRADESObjective, TRADESSettings
from paper_repro.config import RunConfig
from paper_repro.errors import ConfigError
from paper_repro.training.methods import (Context, Method, Objective, objective_epoch,
                                          register_method)

_EPS = 1e-20  # the reference's guard against a zero gradient


def perturbed_weights(model: nn.Module) -> list[str]:
    """The parameters AWP perturbs: weights of more than one dimension (conv and linear)."""
    return [n for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]


class WeightPerturbation:
    """AWP's perturbation of relative size γ per layer, found on a proxy: the model's function at
    a copy of its weights and buffers (`torch.func.functional_call`, run eagerly), so neither its
    weights nor its BatchNorm statistics move while the perturbation is found."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def direction(self, model: nn.Module,
                  loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
        """v_l = γ·‖w_l‖/‖g_l‖·g_l, g = ∇ of the inner loss at the proxy, in the model's mode."""
        names = perturbed_weights(model)
        params = {n: p.detach().clone().requires_grad_(n in names)
                  for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

        def proxy(x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, (params, buffers), (x,))

        with torch.compiler.set_stance("force_eager"):
            grads = torch.autograd.grad(loss_fn(proxy), [params[n] for n in names])
        weights = dict(model.named_parameters())
        return {n: g * (self.gamma * weights[n].detach().norm() / (g.norm() + _EPS))
                for n, g in zip(names, grads)}

    @contextlib.contextmanager
    def __call__(self, model: nn.Module,
                 loss_fn: Callable[[nn.Module], torch.Tensor]) -> Iterator[None]:
        """θ + v inside the block; exactly θ again after it."""
        v = self.direction(model, loss_fn)
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in v}
        with torch.no_grad():
            for n, d in v.items():
                params[n].add_(d)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)


def check_awp(gamma: float, warmup: int) -> None:
    if gamma < 0:
        raise ConfigError(f"gamma must be >= 0, got {gamma}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")


@dataclass(frozen=True)
class ATAWPSettings(PGDSettings):
    gamma: float = 0.01   # relative size of the weight perturbation per layer
    warmup: int = 0       # epochs without AWP before it starts

    def __post_init__(self) -> None:
        super().__post_init__()
        check_awp(self.gamma, self.warmup)


@dataclass(frozen=True)
class TRADESAWPSettings(TRADESSettings):
    alpha_factor: float = 0.25  # 2/255 at 8/255 (TRADES's own script: 0.007 at 0.031)
    gamma: float = 5e-3
    warmup: int = 9             # AWP from 1-indexed epoch 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_awp(self.gamma, self.warmup)


class AWP(Method):
    """The inner objective's epoch, with AWP around each update once the warm-up is over."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.perturbation = WeightPerturbation(self.settings.gamma)

    def objective(self) -> Objective:
        raise NotImplementedError

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        awp = ctx.epoch >= self.settings.warmup and self.settings.gamma > 0
        return objective_epoch(ctx, self.objective(), self.perturbation if awp else None)


@register_method
class ATAWP(AWP):
    name = "at_awp"
    marker = "d"  # its symbol in the Pareto figures
    Settings = ATAWPSettings
    recipe = dict(
        arch="wrn-34-10", epochs=200, batch_size=128, drop_last=False, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=False, weight_decay=5e-4, wd_scope="all", schedule="piecewise",
        schedule_args={"milestones": [0.5, 0.75], "gamma": 0.1},
        augment_pad=4, augment_pad_mode="reflect", augment_flip=True,
    )

    def objective(self) -> Objective:
        return PGDObjective(self.settings)


@register_method
class TRADESAWP(AWP):
    name = "trades_awp"
    marker = "p"  # its symbol in the Pareto figures
    Settings = TRADESAWPSettings
    recipe = dict(
        arch="wrn-34-10", epochs=200, batch_size=128, drop_last=False, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=False, weight_decay=5e-4, wd_scope="all", schedule="multistep",
        schedule_args={"milestones": [99 / 200, 149 / 200], "gamma": 0.1},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
    )

    def objective(self) -> Objective:
        s = self.settings
        return TRADESObjective(s.beta, s.steps, s.alpha_factor)
