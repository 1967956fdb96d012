"""Adversarial Fine-Tuning (AFT), Jeddi et al. 2020, §4.1.

Algorithm:
  1. Pre-train the model naturally (the `natural` method's WRN recipe; WRN-28-10 with dropout
     0.3 in the paper), or start from any pre-trained weights (`init`).
  2. Fine-tune it with PGD adversarial examples for ~10 epochs with Adam and the
     'slow start, fast decay' learning-rate schedule (`schedules.slow_start_fast_decay`),
     stepped every iteration.

The fine-tuning step is PGD AT's step (`paper_repro.training.adversarial.PGDObjective`): only the
optimiser, the schedule, the length and the starting point differ. Where the paper is silent
(PGD steps and α of the training attack, the schedule's parameters, Adam's weight decay,
dropout while fine-tuning) the defaults below are assumptions chosen by a cpu-scale sweep;
the README's ASSUMPTIONS section gives the evidence.

Beyond the paper, the fine-tune can use another objective (`loss = "trades"` or `"mart"`: their
attack and loss, with AFT's `steps` and α) and/or AWP (`awp = true`, γ = `gamma` or the inner
objective's reference γ), from the first fine-tuning epoch (`awp_warmup = 0`: the references'
warm-up lets a model trained from scratch get going; AFT starts from a trained one). At their
defaults these settings are not part of a run's hash (`config.HASH_STABLE_METHOD_ARGS`).
"""
from __future__ import annotations

from dataclasses import dataclass

from baselines.awp import WeightPerturbation, check_awp
from baselines.mart import MARTObjective
from paper_repro.training.adversarial import PGDObjective, PGDSettings
from baselines.trades import TRADESObjective
from paper_repro.errors import ConfigError
from paper_repro.training.methods import (Context, Method, Objective, objective_epoch,
                                          register_method)

LOSSES = ("ce", "trades", "mart")
REFERENCE_GAMMA = {"ce": 0.01, "trades": 5e-3}  # AT-AWP's, TRADES-AWP's (MART-AWP: no script)


@dataclass(frozen=True)
class AFTSettings(PGDSettings):
    loss: str = "ce"            # the fine-tuning objective: PGD AT's CE, TRADES's or MART's
    beta: float = 6.0           # TRADES's / MART's β
    awp: bool = False           # adversarial weight perturbation around each update
    gamma: float | None = None  # AWP's relative size; None: REFERENCE_GAMMA[loss]
    awp_warmup: int = 0         # fine-tuning epochs before AWP starts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        check_awp(0.0 if self.gamma is None else self.gamma, self.awp_warmup)
        if self.awp and self.gamma is None and self.loss not in REFERENCE_GAMMA:
            raise ConfigError(f"awp with loss '{self.loss}': csdongxian/AWP has no script for it, "
                              "so no reference gamma; set method_args.gamma")

    def objective(self, eps: float) -> Objective:
        if self.loss == "ce":
            return PGDObjective(self)
        factor = 0.25 if self.alpha is None else self.alpha / eps  # AFT's α: ε/4 by default
        cls = TRADESObjective if self.loss == "trades" else MARTObjective
        return cls(self.beta, self.steps, factor)


@register_method
class AFT(Method):
    name = "aft"
    marker = "*"  # its symbol in the Pareto figures
    pgd_at_step = True  # with its default loss, "ce": PGD AT's step (bench runs the recipe)
    Settings = AFTSettings
    fine_tunes = True
    recipe = dict(
        arch="wrn-28-10", epochs=10, batch_size=128, optimizer="adam", lr=1e-3,
        weight_decay=0.0, wd_scope="all", schedule="slow_start_fast_decay",
        schedule_args={"start_factor": 0.05, "peak_at": 0.3, "end_factor": 0.01},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
        pretrain={},  # the natural recipe on the same data and model (dropout: per row)
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        s = self.settings
        self.perturbation = WeightPerturbation(REFERENCE_GAMMA[s.loss] if s.gamma is None
                                               else s.gamma) if s.awp else None

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        s = self.settings
        awp = self.perturbation if ctx.epoch >= s.awp_warmup else None
        return objective_epoch(ctx, s.objective(ctx.eps), awp)
