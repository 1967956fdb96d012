"""AFT for practitioners: adversarially fine-tune any model on any (x, y) batches, no runner.

    model = paper_repro.load_pretrained("torchvision:resnet50", num_classes=10)
    model, metrics = paper_repro.finetune(model, train_loader, epsilon=8/255, epochs=10)

This is the runner's AFT, not a second implementation: the config is resolved from AFT's recipe
(`baselines/aft.py`: Adam, `slow_start_fast_decay` stepped every iteration, PGD-10 with
α = ε/4, random start, train-mode BatchNorm during the attack), the optimiser comes from the
method, and every epoch is `AFT.train_epoch` (PGD AT's step, `paper_repro.training.adversarial`,
which calls `attacks.pgd`). Only the data side is adapted: any re-iterable with len() that yields
(x, y) pairs (a torch DataLoader, a list of tensors) instead of the runner's ArrayLoader.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .robustness.attacks import pgd
from .config import build_config
from .data import Batch
from .errors import ConfigError
from .training.methods import Context, get_method
from .training.schedules import make_schedule

__all__ = ["finetune"]


class _Batches:
    """(x, y) pairs from any loader as the Batch the methods read, on the device, x in [0,1]."""

    def __init__(self, loader: Iterable[Any], device: torch.device, what: str) -> None:
        try:
            self.length = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{what} needs len() (the schedule counts steps per epoch): pass "
                              "a DataLoader or a list of batches, not a generator") from None
        if self.length == 0:
            raise ConfigError(f"{what} is empty")
        self.loader, self.device, self.what = loader, device, what

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        for i, item in enumerate(self.loader):
            x, y = item[0], item[1]
            x = x.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = x.float().div_(255)
            if i == 0 and (x.min() < 0 or x.max() > 1):  # one check per epoch, not per batch
                raise ConfigError(f"{self.what}: images must be in [0,1] (ε is in pixels; put "
                                  "the normalisation inside the model, e.g. load_pretrained)")
            yield Batch(x, y.to(self.device, non_blocking=True), None)  # type: ignore[arg-type]


def _accuracy(model: nn.Module, batches: _Batches, *, eps: float, alpha: float,
              steps: int) -> dict[str, float]:
    """Clean and PGD-`steps` accuracy (%), the evaluation protocol: eval mode, one random start."""
    model.eval()
    clean = robust = 0  # device tensors after the first batch: one host sync at the end
    n = 0
    for batch in batches:
        x_adv = pgd(model, batch.x, batch.y, eps=eps, alpha=alpha, steps=steps)
        with torch.no_grad():
            clean = clean + (model(batch.x).argmax(1) == batch.y).sum()
            robust = robust + (model(x_adv).argmax(1) == batch.y).sum()
        n += len(batch.y)
    return {"clean_acc": 100.0 * float(clean) / n, "pgd_acc": 100.0 * float(robust) / n}


def finetune(model: nn.Module, train_loader: Iterable[Any], *, epsilon: float = 8 / 255,
             epochs: int = 10, lr: float = 1e-3, alpha: float | None = None, steps: int = 10,
             schedule: str = "slow_start_fast_decay", schedule_args: dict | None = None,
             weight_decay: float = 0.0, device: str | torch.device | None = None,
             eval_loader: Iterable[Any] | None = None, eval_steps: int = 20,
             seed: int | None = None, verbose: bool = False
             ) -> tuple[nn.Module, list[dict[str, float]]]:
    """Adversarially fine-tune `model` (AFT) and return it (in eval mode) with per-epoch metrics.

    Parameters
    ----------
    model : any nn.Module that takes images in [0,1] and returns logits (normalisation inside
        the model: `load_pretrained` builds such a model from torchvision/timm/a checkpoint).
    train_loader : a re-iterable with len() yielding (x, y, ...) batches, x in [0,1]
        (float) or uint8 0-255; e.g. a torch DataLoader.
    epsilon, alpha, steps : the training attack, L∞ PGD-`steps` with step `alpha` (default
        ε/4), in pixels of the [0,1] range.
    epochs, lr, schedule, schedule_args, weight_decay : Adam with the per-iteration schedule
        (default: AFT's slow start, fast decay to 1% of the peak `lr`).
    device : where to train; default the device the model's parameters are on.
    eval_loader : if given, clean and PGD-`eval_steps` (α = ε/4) accuracy after every epoch.

    Returns
    -------
    (model, metrics): one dict per epoch with epoch, lr (at the epoch's start), train_loss and
    train_adv_acc (on the PGD examples trained on), time_s, and clean_acc / pgd_acc (%) when
    eval_loader is given.

    Example
    -------
    >>> model, metrics = finetune(model, loader, epsilon=8/255, epochs=10, eval_loader=test)
    >>> metrics[-1]["pgd_acc"]
    """
    aft = get_method("aft")
    cfg = build_config(("AFT recipe", aft.recipe), ("finetune()", dict(
        eps=epsilon, epochs=epochs, lr=lr, weight_decay=weight_decay, schedule=schedule,
        method_args={"steps": steps, "alpha": alpha},
        **({"schedule_args": schedule_args} if schedule_args is not None else {}))),
        experiment="api", row="finetune", method="aft")
    method = aft(cfg)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if seed is not None:
        torch.manual_seed(seed)
    model.to(device)
    train = _Batches(train_loader, device, "train_loader")
    evaluation = _Batches(eval_loader, device, "eval_loader") if eval_loader is not None else None
    ctx = Context(model=model, optimizers=method.make_optimizers(model),
                  schedule=make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs,
                                         **cfg.schedule_args),
                  loader=train, cfg=cfg, device=device, epoch=0,  # type: ignore[arg-type]
                  steps_per_epoch=method.optimizer_steps_per_epoch(len(train)))
    metrics: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        ctx.epoch = epoch
        row: dict[str, float] = {"epoch": epoch + 1, "lr": ctx.current_lr()}
        t0 = time.perf_counter()
        stats = method.train_epoch(ctx)
        row.update(train_loss=stats["train_loss"], train_adv_acc=stats["train_acc"],
                   time_s=round(time.perf_counter() - t0, 3))
        if evaluation is not None:
            row.update(_accuracy(model, evaluation, eps=cfg.eps, alpha=cfg.eval_alpha_value,
                                 steps=eval_steps))
        metrics.append(row)
        if verbose:
            print(" | ".join(f"{k} {v:.4g}" for k, v in row.items()))
    model.eval()
    return model, metrics
