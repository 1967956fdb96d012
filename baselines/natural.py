"""Natural (clean) training: the Wide-ResNet recipe (Zagoruyko & Komodakis, 2016).

Reference: szagoruyko/wide-residual-networks (official Torch7 code), as recorded in
shared/reference/baselines_spec.md §8.2; the AFT paper pre-trains its WRN-28-10 the same way.
Recipe: SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4 on all parameters, batch 128
(last incomplete batch dropped), 200 epochs, LR × 0.2 at epochs 60/120/160, random crop with
4-px reflection padding and horizontal flip.

Deviations: none in the update rule. The WRN paper's dropout 0.3 is a model setting
(`model_args.dropout`), set where a row uses it (AFT's pre-training).
"""
from __future__ import annotations

import torch.nn.functional as F

from paper_repro.training.methods import Context, Meter, Method, register_method


@register_method
class Natural(Method):
    name = "natural"
    marker = "o"  # its symbol in the Pareto figures
    attack_passes = None  # no attack
    recipe = dict(
        arch="wrn-28-10", epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
        nesterov=True, weight_decay=5e-4, wd_scope="all", schedule="piecewise",
        schedule_args={"milestones": [0.3, 0.6, 0.8], "gamma": 0.2},
        augment_pad=4, augment_pad_mode="reflect", augment_flip=True,
    )

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        model, meter = ctx.model, Meter(ctx.device)
        model.train()
        for batch in ctx.loader:
            logits = model(batch.x)
            loss = F.cross_entropy(logits, batch.y)
            loss.backward()
            ctx.step()
            meter.update(logits, batch.y, loss)
            if ctx.done:
                break
        return meter.result()
