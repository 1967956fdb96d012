"""Per-epoch curves (Fig 1, Fig 4): clean accuracy on the whole test set and PGD accuracy on
fixed subsets of the test and the (un-augmented) training images, measured after every epoch,
and the one line a run prints per epoch. With a validation split (val_n > 0) every epoch is
also scored on the validation images, the only numbers early stopping may look at (DESIGN §2:
validation, never test, for choices)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..config import RunConfig
from ..data.splits import Data, fixed_subset
from ..robustness.evaluation import VAL_STEPS, clean_accuracy, pgd_accuracy


@dataclass
class MonitorSets:
    """The per-epoch evaluation images, already on the device (uint8)."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    test_subset_x: torch.Tensor
    test_subset_y: torch.Tensor
    train_subset_x: torch.Tensor
    train_subset_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None


def monitor_sets(cfg: RunConfig, data: Data, device: torch.device) -> MonitorSets:
    """Evaluation images move to the device once, not batch by batch every epoch."""
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    test_idx = fixed_subset(len(test_y), cfg.monitor_n)
    train_idx = fixed_subset(len(data.train_y), cfg.monitor_n)  # streamed: all of them
    val = (data.val_x.to(device), data.val_y.to(device)) if data.val_x is not None \
        else (None, None)
    return MonitorSets(test_x, test_y, test_x[test_idx], test_y[test_idx],
                       data.train_x[train_idx].to(device), data.train_y[train_idx].to(device),
                       *val)


def monitor(model: nn.Module, sets: MonitorSets, cfg: RunConfig,
            device: torch.device) -> dict[str, float]:
    """This epoch's point of the curves: test_clean_acc, and test_pgd_acc / train_pgd_acc
    when monitoring is on (monitor_n and monitor_steps > 0)."""
    out = {"test_clean_acc": clean_accuracy(model, sets.test_x, sets.test_y,
                                            batch=cfg.eval_batch, device=device)}
    if cfg.monitor_n > 0 and cfg.monitor_steps > 0:
        kwargs = dict(eps=cfg.eps, alpha=cfg.eval_alpha_value, steps=cfg.monitor_steps,
                      batch=cfg.eval_batch, device=device)
        out["test_pgd_acc"] = pgd_accuracy(model, sets.test_subset_x, sets.test_subset_y,
                                           **kwargs)
        out["train_pgd_acc"] = pgd_accuracy(model, sets.train_subset_x, sets.train_subset_y,
                                            **kwargs)
    if sets.val_x is not None:
        out.update(validation_scores(model, sets.val_x, sets.val_y, cfg, device))
    return out


VAL_SCORE = "val_pgd_acc"  # the per-epoch score early stopping maximises (best.pt)
_VAL_SEED = 20201224       # the same random start every epoch: epochs compared on equal terms


def validation_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig,
                      device: torch.device) -> dict[str, float]:
    """val_clean_acc and val_pgd_acc (PGD-10 as Rice et al. validate, α = ε/4, one random
    start, eval mode) on the validation images. The random start is drawn from a fixed seed in
    a forked RNG, so it neither depends on nor changes the run's random stream: the scores do
    not change how the run trains."""
    with _forked_rng(device):
        torch.manual_seed(_VAL_SEED)
        return {"val_clean_acc": clean_accuracy(model, x, y, batch=cfg.eval_batch,
                                                device=device),
                VAL_SCORE: pgd_accuracy(model, x, y, eps=cfg.eps, alpha=cfg.eval_alpha_value,
                                        steps=VAL_STEPS, batch=cfg.eval_batch, device=device)}


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def epoch_line(run_path: str, row: dict[str, Any], epochs: int) -> str:
    parts = [f"{run_path} epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.3g}",
             f"loss {row['train_loss']:.3f}", f"test clean {row['test_clean_acc']:.2f}"]
    if "test_pgd_acc" in row:
        parts.append(f"test PGD {row['test_pgd_acc']:.2f} train PGD {row['train_pgd_acc']:.2f}")
    if VAL_SCORE in row:
        parts.append(f"val PGD {row[VAL_SCORE]:.2f}")
    parts.append(f"{row['train_time_s']:.0f}s")
    return " | ".join(parts)


class ProgressLoader:
    """Wraps the loader so a progress bar with ETA ticks per batch."""

    def __init__(self, loader: Any, bar: Any) -> None:
        self.loader, self.bar = loader, bar

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update(1)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
