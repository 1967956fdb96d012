"""Fast adversarial training, FGSM with a random start (Wong et al., 2020), as in
locuslab/fast_adversarial CIFAR10/train_fgsm.py.

Algorithm (baselines_spec.md §5.1), per minibatch, the model in train mode throughout:
    δ ~ U(−ε, ε), clamped so that x + δ ∈ [0,1]
    δ ← Π_ε(δ + α·sign ∇δ L(f(x+δ), y)), clamped so that x + δ ∈ [0,1]      (α = 1.25ε)
    θ ← θ − η ∇θ L(f(x+δ), y)                                            (adversarial loss only)
The FGSM step is `paper_repro.robustness.attacks.fgsm_rs`, i.e. the shared PGD with one step.

Catastrophic-overfitting guard (the reference's `--early-stop`, off by default there and here):
after each epoch, PGD-5 with α = ε/4 and one random start on that epoch's first training
minibatch, the model still in train mode; if this robust accuracy (a fraction) fell by more than
0.2 since the previous check, put back the weights saved at the previous check and stop training.

Reference recipe [FA]: PreActResNet18, 15 epochs, batch 128, SGD momentum 0.9, weight decay 5e-4
on all parameters, a triangular cyclic LR 0 → 0.2 → 0 stepped every iteration whose momentum
cycles 0.9 ↔ 0.8 inversely to the LR (PyTorch CyclicLR's default), zero-padding-4 random crop +
flip, α = 10/255 at ε = 8/255.

Deviations:
- No apex O2 / fp16: fp32 weights throughout (the reference keeps no fp32 master weights by
  default); on a GPU the convs run in bf16 autocast (`paper_repro/runtime/fastpath.py`), fp32 on
  CPU.
- δ lives in [0,1] pixel space and the model normalises internally, instead of a per-channel
  ε_c = ε/σ_c in normalised space: equivalent, since sign() ignores positive per-channel scales.
- The guard's PGD-5 is the suite's PGD, which keeps stepping examples already misclassified
  (the reference's `attack_pgd` stops updating them); their predictions can only stay wrong
  or flip back, so the check is at most marginally stronger.
- Final evaluation uses the suite's protocol (PGD-20, α = ε/4, one restart), not PGD-50 × 10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from paper_repro.robustness.attacks import fgsm_rs, pgd
from paper_repro.errors import ConfigError
from paper_repro.training.methods import Context, Meter, Method, register_method


@dataclass(frozen=True)
class FastSettings:
    alpha_factor: float = 1.25    # α = alpha_factor · ε (10/255 at 8/255)
    early_stop: bool = False      # the catastrophic-overfitting guard ([FA] `--early-stop`)
    early_stop_drop: float = 0.2  # stop when the guard's robust accuracy falls by more than this
    early_stop_steps: int = 5     # PGD steps of the guard (α = ε/4, one random start)

    def __post_init__(self) -> None:
        if self.alpha_factor <= 0:
            raise ConfigError(f"alpha_factor must be > 0, got {self.alpha_factor}")
        if not 0 <= self.early_stop_drop <= 1:
            raise ConfigError(f"early_stop_drop must be in [0, 1], got {self.early_stop_drop}")
        if self.early_stop_steps < 1:
            raise ConfigError(f"early_stop_steps must be >= 1, got {self.early_stop_steps}")


@register_method
class FastAT(Method):
    name = "fast_at"
    marker = "v"  # its symbol in the Pareto figures
    Settings = FastSettings
    recipe = dict(
        arch="preact-resnet18", epochs=15, batch_size=128, optimizer="sgd", lr=0.2,
        momentum=0.9, nesterov=False, weight_decay=5e-4, wd_scope="all", schedule="cyclic",
        schedule_args={"min_lr": 0.0, "up_fraction": 0.5, "base_momentum": 0.8,
                       "max_momentum": 0.9},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
    )

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.prev_robust_acc = 0.0  # the guard's last accuracy (the reference starts from 0)
        self.best_state: dict[str, torch.Tensor] | None = None  # CPU weights at that check

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        model, meter = ctx.model, Meter(ctx.device)
        alpha = self.settings.alpha_factor * ctx.eps
        first_batch = None
        model.train()  # FGSM and update both in train mode, as the reference
        for batch in ctx.loader:
            if first_batch is None:  # the whole global batch (every rank checks the same)
                first_batch = (ctx.gather(batch.x), ctx.gather(batch.y))
            x_adv = fgsm_rs(model, batch.x, batch.y, eps=ctx.eps, alpha=alpha)
            logits = model(x_adv)
            loss = F.cross_entropy(logits, batch.y)
            loss.backward()
            ctx.step()
            meter.update(logits, batch.y, loss)
            if ctx.done:
                break
        stats = meter.result()
        if self.settings.early_stop and first_batch is not None:
            stats["guard_pgd_acc"] = 100.0 * self._guard(ctx, *first_batch)
        return stats

    def _guard(self, ctx: Context, x: torch.Tensor, y: torch.Tensor) -> float:
        """Catastrophic-overfitting check; restores the last good weights and stops on a collapse."""
        robust_acc = self._robust_accuracy(ctx.model, x, y, ctx.eps)
        if robust_acc - self.prev_robust_acc < -self.settings.early_stop_drop:
            # The first check cannot get here (accuracy >= 0), so best_state exists.
            ctx.model.load_state_dict(self.best_state)
            ctx.request_stop(f"catastrophic overfitting: guard PGD-{self.settings.early_stop_steps}"
                             f" accuracy fell from {self.prev_robust_acc:.3f} to {robust_acc:.3f}"
                             f" in epoch {ctx.epoch + 1}; weights of epoch {ctx.epoch} restored")
            return robust_acc
        self.prev_robust_acc = robust_acc
        self.best_state = {k: v.detach().to("cpu", copy=True)
                           for k, v in ctx.model.state_dict().items()}
        return robust_acc

    def _robust_accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         eps: float) -> float:
        """PGD-k (α = ε/4, one random start) accuracy on one batch, in train mode as [FA]: the
        attack and the final forward use batch statistics (and update the running ones)."""
        model.train()
        x_adv = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=self.settings.early_stop_steps)
        with torch.no_grad():
            correct = (model(x_adv).argmax(1) == y).sum().item()
        return correct / max(len(y), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"prev_robust_acc": self.prev_robust_acc, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_robust_acc = float(state.get("prev_robust_acc", 0.0))
        best = state.get("best_state")
        # The runner moves method state to the device; the copy lives on the CPU.
        self.best_state = None if best is None else {k: v.detach().to("cpu", copy=True)
                                                     for k, v in best.items()}
