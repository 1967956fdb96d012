"""Adversarial Fine-Tuning (AFT), Jeddi et al. 2020, §4.1.

Algorithm:
  1. Pre-train the model naturally (the `natural` method's WRN recipe; WRN-28-10 with dropout
     0.3 in the paper), or start from any pre-trained weights (`init`).
  2. Fine-tune it with PGD adversarial examples for ~10 epochs with Adam and the
     'slow start, fast decay' learning-rate schedule (`schedules.slow_start_fast_decay`),
     stepped every iteration.

The fine-tuning step is PGD AT's step (`baselines.pgd_at.adversarial_epoch`): only the
optimiser, the schedule, the length and the starting point differ. Where the paper is silent
(PGD steps and α of the training attack, the schedule's parameters, Adam's weight decay,
dropout while fine-tuning) the defaults below are assumptions chosen by a cpu-scale sweep;
the README's ASSUMPTIONS section gives the evidence.
"""
from __future__ import annotations

from baselines.pgd_at import PGDSettings, adversarial_epoch
from paper_repro.methods import Context, Method, register_method


@register_method
class AFT(Method):
    name = "aft"
    Settings = PGDSettings
    fine_tunes = True
    recipe = dict(
        arch="wrn-28-10", epochs=10, batch_size=128, optimizer="adam", lr=1e-3,
        weight_decay=0.0, wd_scope="all", schedule="slow_start_fast_decay",
        schedule_args={"start_factor": 0.05, "peak_at": 0.3, "end_factor": 0.01},
        augment_pad=4, augment_pad_mode="zeros", augment_flip=True,
        pretrain={},  # the natural recipe on the same data and model (dropout: per row)
    )

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        return adversarial_epoch(ctx, self.settings)
