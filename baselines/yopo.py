"""YOPO-m-n, "You Only Propagate Once" (Zhang et al., 2019),
as in a1600012888/YOPO-You-Only-Propagate-Once.

Algorithm, per minibatch (baselines_spec.md §6; experiments/CIFAR10/wide34.yopo-5-3):
    η ~ U(−ε, ε)                                          (not clamped to the image box)
    repeat m times:
        L = CE(f(x+η), y), backward                       (gradients ACCUMULATE: no zero_grad)
        p = −∂L/∂z₀                                       (z₀ = f₀(x+η): the output of layer one)
        repeat n times, running layer one only (f₀ = stem ∘ normalize):
            H = Σ f₀(clamp(x+η, 0, 1)) ⊙ p
            η ← Π_ε(η − σ·sign ∂H/∂η), then clamp x+η to [0,1]
        backward of −H at the final η                     (layer one's Hamiltonian gradient)
    one step of both optimisers (layer one; everything else) on the summed gradients

Since p = −∂L/∂z₀, the inner update is sign-ascent on the linearised loss ⟨f₀(x+η), ∂L/∂z₀⟩,
and −H's weight gradient is layer one's share of ∂L/∂θ₀ at the new η. Each minibatch costs m
full forward+backward passes, m·n layer-one passes, and ONE weight update on the sum of m
mean-CE gradients: hence the reference's LR scaling by 1/m.

Reference recipe (wide34.yopo-5-3, the WRN-34-10 of Table 1): m=5, n=3, σ=2/255 at ε=8/255,
the model in train mode throughout (BN batch statistics in all m passes; the inner steps never
reach a BN), two SGD optimisers (layer one; the other layers), each lr 0.1·4/m = 0.08,
momentum 0.9, weight decay 5e-4 on all parameters, MultiStepLR ×0.1 at epochs 30/34/36 stepped
per epoch, batch 256 without dropping the last partial batch, zero-padding-4 random crop + flip
on [0,1] inputs. The loop trains 37 epochs although num_epochs is 36 (off by one), so
epochs=37 with milestones 30/37, 34/37, 36/37: LR 0.08 for epochs 1-30, 0.008 for 31-34,
0.0008 for 35-36, 0.00008 for 37. The PreActResNet18 experiment (pre-res18.yopo-5-3, arch
"preact-resnet18-yopo") uses lr 0.1·2/m = 0.04 instead. The LR is not rescaled when `passes`
changes: set lr = 0.1·4/m yourself.

Deviations:
- The registry's WRN-34-10 uses Kaiming (MSR) init; YOPO's copy leaves its custom init commented
  out, i.e. PyTorch's default init. It also omits YOPO's unused `sub_block1` (same function).
- Normalisation is inside our models (mean/std), YOPO has none on its [0,1] inputs. Layer one's
  function f₀ therefore includes the normalize layer, so η stays a [0,1]-pixel perturbation.
- σ defaults to ε/4 (= 2/255 at 8/255), so the inner step keeps its ratio to ε at other scales.
- The reported training loss/accuracy is the last full pass's (at the m-th η); the reference
  logs the first pass's accuracy and a separate forward at the final η.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from paper_repro.robustness.attacks import LinfThreat, attack_pass, frozen_parameters
from paper_repro.errors import ConfigError
from paper_repro.training.methods import (Context, Meter, Method, make_optimizer, parameter_groups,
                                 register_method)


@dataclass(frozen=True)
class YOPOSettings:
    passes: int = 5               # m: full forward/backward passes per minibatch
    inner_steps: int = 3          # n: layer-one updates of η per pass
    sigma: float | None = None    # inner step size in pixels; None: ε/4 (2/255 at ε = 8/255)

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise ConfigError(f"passes must be >= 1, got {self.passes}")
        if self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.sigma is not None and not 0 < self.sigma <= 1:
            raise ConfigError(f"sigma must be in (0, 1], got {self.sigma}")


@contextlib.contextmanager
def _capture_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep `module`'s forward output, with its gradient retained, while the block runs."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["out"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def hamiltonian(layer_one: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                eta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """H = Σ f₀(clamp(x+η, 0, 1)) ⊙ p (the reference's reg_cof is 0: no weight-norm term)."""
    return (layer_one((x + eta).clamp(0.0, 1.0)) * p).sum()


@attack_pass
def layer_one_steps(layer_one: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    eta: torch.Tensor, p: torch.Tensor, *, threat: LinfThreat, sigma: float,
                    steps: int) -> torch.Tensor:
    """n updates η ← Π_ε(η − σ·sign ∂H/∂η), x+η clamped to [0,1]; calls layer one only.

    The gradient flows through the clamp, as in the reference: a pixel of the (unclamped)
    initial x+η outside [0,1] gets a zero gradient, so only the projection moves it.
    """
    for _ in range(steps):
        eta = eta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(hamiltonian(layer_one, x, eta, p), eta)
        eta = threat.step(eta.detach(), -grad, sigma)  # δ + α·sign(−g) = η − σ·sign(∂H/∂η)
        eta = threat.clamp_to_image(x, threat.project(eta))
    return eta.detach()


@register_method
class YOPO(Method):
    name = "yopo"
    marker = "D"  # its symbol in the Pareto figures
    attack_passes = "eager"  # layer_one_steps call the stem outside the compiled model
    Settings = YOPOSettings
    recipe = dict(
        arch="wrn-34-10", epochs=37, batch_size=256, drop_last=False, optimizer="sgd", lr=0.08,
        momentum=0.9, nesterov=False, weight_decay=5e-4, wd_scope="all", schedule="multistep",
        schedule_args={"milestones": [30 / 37, 34 / 37, 36 / 37], "gamma": 0.1},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
    )

    def make_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        """[layer one's optimiser, the other layers' optimiser], same hyper-parameters."""
        layer_one = {id(p) for p in model.stem.parameters()}
        groups = parameter_groups(model, self.cfg.weight_decay, self.cfg.wd_scope)

        def part(in_layer_one: bool) -> list[dict]:
            split = [{**g, "params": [p for p in g["params"]
                                      if (id(p) in layer_one) == in_layer_one]} for g in groups]
            return [g for g in split if g["params"]]

        return [make_optimizer(part(True), self.cfg), make_optimizer(part(False), self.cfg)]

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        s = self.settings
        model, meter = ctx.model, Meter(ctx.device)
        threat = LinfThreat(ctx.eps)
        sigma = ctx.eps / 4 if s.sigma is None else s.sigma

        def layer_one(v: torch.Tensor) -> torch.Tensor:  # f₀: never calls the rest of the network
            return model.stem(model.normalize(v))

        model.train()
        for batch in ctx.loader:
            x, y = batch.x, batch.y
            for opt in ctx.optimizers:
                opt.zero_grad(set_to_none=True)
            eta = torch.empty_like(x).uniform_(-ctx.eps, ctx.eps)  # not clamped (reference)
            for _ in range(s.passes):
                with _capture_output(model.stem) as z0:
                    logits = model(x + eta)
                loss = F.cross_entropy(logits, y)
                loss.backward()  # no zero_grad: the m passes' gradients add up
                p = -z0["out"].grad.detach()
                with frozen_parameters(model.stem):  # the inner steps need ∂H/∂η only
                    eta = layer_one_steps(layer_one, x, eta, p, threat=threat, sigma=sigma,
                                          steps=s.inner_steps)
                (-hamiltonian(layer_one, x, eta, p)).backward()  # layer one's extra gradient
            ctx.step()  # one update of both optimisers on the accumulated gradients
            meter.update(logits, y, loss)
            if ctx.done:
                break
        return meter.result()
