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

The step itself (`PGDSettings`, `adversarial_epoch`) is in paper_repro/training/adversarial.py:
AFT, AWP and the benchmark share it.
"""
from __future__ import annotations

from paper_repro.training.adversarial import PGDSettings, adversarial_epoch
from paper_repro.training.methods import Context, Method, register_method


@register_method
class PGDAT(Method):
    name = "pgd_at"
    marker = "s"  # its symbol in the Pareto figures
    pgd_at_step = True  # `bench --baseline-loop` times the reference loop beside it
    Settings = PGDSettings
    recipe = dict(
        arch="wrn-32-10", epochs=205, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
        nesterov=False, weight_decay=2e-4, wd_scope="weights", schedule="piecewise",
        schedule_args={"milestones": [0.5, 0.75], "gamma": 0.1},
        augment_pad=2, augment_pad_mode="zeros", augment_flip=True,
    )

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        return adversarial_epoch(ctx, self.settings)
