"""The project's only attack code: L∞ PGD with a random start, and FGSM-RS as its one-step case.

Everything is in [0,1] pixel space: the model normalises internally, so ε and α are plain
pixel fractions (8/255, 2/255). The update order is the reference one (Madry, Rice):
ascent step → projection onto the ε-ball → clamp to [0,1].

Attack passes compute no weight gradients. `torch.autograd.grad(loss, delta)` only walks the
path to δ, and the parameters are additionally frozen (`requires_grad_(False)`) for the
duration of the attack, which also keeps a `torch.compile`d model from producing weight
gradients (pytorch#132929). Parameter `.grad` fields are never touched.

The caller chooses the model mode (train-mode BN for Madry/Rice/Fast, eval mode for ATTA
and for every evaluation): the attack never calls `model.train()` or `model.eval()`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Every function that runs an attack-only pass (no weight update follows from it), as (module,
# name): filled by `@attack_pass` where each is defined, read by perf/probes.py, which watches
# them for weight gradients they must not compute.
ATTACK_PASSES: list[tuple[str, str]] = []


def attack_pass(fn: Callable) -> Callable:
    """Mark `fn` as an attack-only pass (the probes then watch every call of it). Callers must
    reach it through its module's global name, which is what the probes replace."""
    if (fn.__module__, fn.__name__) not in ATTACK_PASSES:
        ATTACK_PASSES.append((fn.__module__, fn.__name__))
    return fn
"""(logits, labels) -> per-example losses."""


def per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def per_example_kl(logits: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ softmax(logits)) per example: TRADES's attack objective, whose "labels" are
    the clean prediction's probabilities (its sum-reduced KLDivLoss, per example)."""
    return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(1)


def gaussian_start(x: torch.Tensor, std: float = 0.001) -> torch.Tensor:
    """δ = std·N(0, 1): TRADES's and MART's start, for `pgd(..., delta=...)`."""
    return std * torch.randn_like(x)


@dataclass(frozen=True)
class LinfThreat:
    """An L∞ ball of radius `eps` around x, intersected with the [0,1] image box."""

    eps: float

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        """δ ~ U(−ε, ε), then moved so that x + δ stays a valid image."""
        delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        return self.clamp_to_image(x, delta)

    def step(self, delta: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        """Ascent: δ + α·sign(∇δ L)."""
        return delta + alpha * grad.sign()

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Projection onto the ε-ball."""
        return delta.clamp(-self.eps, self.eps)

    @staticmethod
    def clamp_to_image(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Clamp so that x + δ ∈ [0,1] (δ ∈ [−x, 1−x])."""
        return (x + delta).clamp(0.0, 1.0) - x


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter that had it.

    Why: an attack needs ∂L/∂x only. Freezing makes that explicit, prunes every weight-gradient
    kernel (also in compiled graphs), and guarantees no parameter `.grad` is written.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                   loss_fn: LossFn = per_example_ce) -> tuple[torch.Tensor, torch.Tensor]:
    """∂L/∂x at x_adv without any weight gradient; returns (gradient, logits).

    The loss is summed over the batch: L∞ steps only use the sign, and a summed loss keeps
    per-pixel gradients away from underflow in reduced precision.
    """
    with frozen_parameters(model):
        return _input_gradient(model, x_adv, y, loss_fn)


@attack_pass
def _input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
                    loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_gradient` for a model whose parameters the caller has already frozen."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = loss_fn(logits.float(), y).sum()
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad, logits.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
        steps: int, random_start: bool = True, delta: torch.Tensor | None = None,
        loss_fn: LossFn = per_example_ce) -> torch.Tensor:
    """L∞ PGD-k; returns the adversarial images x + δ (detached, in the ε-ball and [0,1]).

    `delta` starts the attack from a given perturbation (e.g. a carried one) instead of a
    random start. With `steps=1`, `random_start=True` and `alpha=1.25·eps` this is FGSM-RS.
    """
    threat = LinfThreat(eps)
    x = x.detach()
    if delta is not None:
        delta = threat.clamp_to_image(x, threat.project(delta.detach()))
    elif random_start:
        delta = threat.random_start(x)
    else:
        delta = torch.zeros_like(x)
    with frozen_parameters(model):  # once per attack, not per step
        for _ in range(steps):
            grad, _ = _input_gradient(model, x + delta, y, loss_fn)
            delta = threat.step(delta, grad, alpha)
            delta = threat.project(delta)
            delta = threat.clamp_to_image(x, delta)
    return (x + delta).detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
            alpha: float | None = None) -> torch.Tensor:
    """FGSM with a uniform random start (Wong et al.): one PGD step of α = 1.25ε by default."""
    return pgd(model, x, y, eps=eps, alpha=1.25 * eps if alpha is None else alpha, steps=1)
