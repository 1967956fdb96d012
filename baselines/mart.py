"""MART, Misclassification Aware adveRsarial Training (Wang et al., ICLR 2020), as in
YisenWang/MART (mart.py, train_wideresnet.py).

Algorithm, per minibatch:
    model.eval();  δ ← 0.001·N(0, 1);  PGD-k on CE(f(x+δ), y) (ε-ball, [0,1])
    model.train(); p = softmax(f(x)), q = softmax(f(x_adv)), ŷ = argmax_{k≠y} q_k
    BCE = CE(f(x_adv), y) − log(1.0001 − q_ŷ + 1e-12)                  (boosted cross-entropy)
    θ ← θ − η ∇θ [ mean(BCE) + β · mean_i( KL(p_i ‖ q_i) · (1.0000001 − p_i,y) ) ]
The KL uses log(q + 1e-12); gradients flow through the weight (1 − p_y) too, as in the reference.
The attack is the shared PGD from MART's start (`attacks.gaussian_start`).

Reference recipe (train_wideresnet.py): WRN-34-10, β = 6, PGD-10 with step 0.007 at ε = 0.031
in eval mode, SGD lr 0.1, momentum 0.9, weight decay 7e-4 on all parameters, batch 128 (last
partial batch kept), 90 epochs with LR × 0.1 from 1-indexed epoch 75 and × 0.01 at epoch 90,
zero-padding-4 random crop + flip.

Deviations:
- ε is the table's (8/255 at paper scale), not 0.031; the step keeps its ratio 0.007/0.031 to ε.
- The shared PGD projects the start onto the ε-ball and [0,1] before the first gradient.
- ŷ is the argmax over the other classes (the reference takes the top two of an argsort); they
  differ only on exact ties.
- The network is the registry's WRN-34-10 (Rice's wiring).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.trades import REFERENCE_ALPHA_FACTOR, check_objective
from paper_repro.robustness.attacks import gaussian_start, pgd
from paper_repro.training.methods import Context, Method, objective_epoch, register_method


@dataclass(frozen=True)
class MARTSettings:
    beta: float = 6.0                             # λ in the paper, `beta` in the code
    steps: int = 10                               # k
    alpha_factor: float = REFERENCE_ALPHA_FACTOR  # α = alpha_factor · ε (0.007 at 0.031)

    def __post_init__(self) -> None:
        check_objective(self.beta, self.steps, self.alpha_factor)


def mart_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
              beta: float) -> torch.Tensor:
    """Boosted CE on x_adv + β · the (1 − p_y(x))-weighted KL(p(x) ‖ p(x_adv)), batch means."""
    q = F.softmax(logits_adv, dim=1)
    others = q.masked_fill(F.one_hot(y, q.size(1)).bool(), float("-inf"))
    y_hat = others.argmax(dim=1)  # the most likely wrong class
    boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - q + 1e-12), y_hat)
    p = F.softmax(logits, dim=1)
    p_true = p.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(q + 1e-12), p, reduction="none").sum(1)
    return boosted + beta * (kl * (1.0000001 - p_true)).mean()


@dataclass(frozen=True)
class MARTObjective:
    beta: float
    steps: int
    alpha_factor: float

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps: float) -> torch.Tensor:
        model.eval()
        return pgd(model, x, y, eps=eps, alpha=self.alpha_factor * eps, steps=self.steps,
                   delta=gaussian_start(x))

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, logits_adv = model(x), model(x_adv)
        return mart_loss(logits, logits_adv, y, self.beta), logits_adv


@register_method
class MART(Method):
    name = "mart"
    marker = "h"  # its symbol in the Pareto figures
    Settings = MARTSettings
    recipe = dict(
        arch="wrn-34-10", epochs=90, batch_size=128, drop_last=False, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=False, weight_decay=7e-4, wd_scope="all", schedule="multistep",
        schedule_args={"milestones": [74 / 90, 89 / 90], "gamma": 0.1},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
    )

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        s = self.settings
        return objective_epoch(ctx, MARTObjective(s.beta, s.steps, s.alpha_factor))
