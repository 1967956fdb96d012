"""Free adversarial training, Free-m (Shafahi et al., 2019), as in ashafahi/free_adv_train.

Algorithm (baselines_spec.md §4.1), with one perturbation buffer δ of batch shape, set to zero
once and never reset:
    for each minibatch (x, y), replayed m times:
        g_θ, g_δ ← ∇_θ, ∇_δ L(f(clamp(x + δ, 0, 1)), y)     (ONE forward, ONE backward)
        δ ← Π_ε(δ + ε·sign(g_δ))                              (ascent step of size ε)
        θ ← θ − η·g_θ                                        (the gradient at the OLD δ)
δ carries over to the next minibatch and the next epoch. Every replay is an optimiser step, so
`optimizer_steps_per_epoch` is m × batches and the schedule counts replays; `epochs` counts
passes over the data.

Reference recipe [FT]: m = 8, Madry's WRN-32-10 (TF network), train mode throughout (BatchNorm
batch statistics), momentum SGD 0.9 without Nesterov, weight decay 2e-4 on conv/FC weights only,
batch 128, 80k optimiser steps (replays included) with LR 0.1 → 0.01 → 0.001 at 40k / 60k,
zero-padding-2 random crop + flip, fp32. x + δ is clamped to the image box in the forward only;
the stored δ is clipped to the ε-ball only (as in [FT], and unlike [FA]'s train_free.py, which
also clamps δ to the valid range of the current x).

Deviations:
- 80,000 steps become 26 data passes of 390 minibatches × 8 replays = 81,120 optimiser steps
  (LR drops at steps 40,560 and 60,840): epochs are the runner's unit.
- A partial last minibatch of b < 128 examples uses and updates δ[:b], as [FI] and [FA] do;
  [FT] never sees one (its loader drops it, as the runner does by default).
- The per-image standardisation, leaky ReLU and BN constants of the TF network are the model
  registry's `wrn-32-10`, not this file's business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from paper_repro.robustness.attacks import LinfThreat
from paper_repro.errors import ConfigError
from paper_repro.training.methods import Context, Meter, Method, register_method


@dataclass(frozen=True)
class FreeSettings:
    replays: int = 8  # m: optimiser steps (and δ ascent steps) per minibatch

    def __post_init__(self) -> None:
        if self.replays < 1:
            raise ConfigError(f"replays must be >= 1, got {self.replays}")


@register_method
class FreeAT(Method):
    name = "free_at"
    marker = "^"  # its symbol in the Pareto figures
    attack_passes = None  # each replay's one backward updates δ and the weights at once
    Settings = FreeSettings
    recipe = dict(
        arch="wrn-32-10", epochs=26, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
        nesterov=False, weight_decay=2e-4, wd_scope="weights", schedule="piecewise",
        schedule_args={"milestones": [0.5, 0.75], "gamma": 0.1},
        augment_pad=2, augment_pad_mode="zeros", augment_flip=True,
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.delta: torch.Tensor | None = None  # the persistent perturbation, made at the first batch

    def optimizer_steps_per_epoch(self, batches: int) -> int:
        return self.settings.replays * batches

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        model, meter = ctx.model, Meter(ctx.device)
        threat = LinfThreat(ctx.eps)
        model.train()  # as [FT]: batch statistics, running stats updated by every replay
        for batch in ctx.loader:
            x, y = batch.x, batch.y
            b = len(y)
            if self.delta is None:  # zero once; never reset afterwards
                rows = max(ctx.cfg.batch_size, b)
                self.delta = torch.zeros((rows, *x.shape[1:]), device=x.device, dtype=x.dtype)
            for _ in range(self.settings.replays):
                delta = self.delta[:b].clone().requires_grad_(True)
                logits = model((x + delta).clamp(0.0, 1.0))  # clamp in the forward only
                loss = F.cross_entropy(logits, y)
                loss.backward()  # one backward: ∇θ (left in .grad for the step) and ∇δ
                with torch.no_grad():  # ascent with step size ε; δ[b:] stays as it was
                    self.delta[:b] = threat.project(threat.step(delta, delta.grad, ctx.eps))
                ctx.step()  # θ moves with the gradient taken at the old δ
                meter.update(logits, y, loss)
                if ctx.done:
                    return meter.result()
        return meter.result()

    def state_dict(self) -> dict[str, Any]:
        return {"delta": None if self.delta is None else self.delta.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        delta = state.get("delta")
        self.delta = None if delta is None else delta.detach().clone()
