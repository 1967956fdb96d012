"""Per-epoch curves (Fig 1, Fig 4): clean accuracy on the whole test set and PGD accuracy on
fixed subsets of the test and the (un-augmented) training images, measured after every epoch,
and the one line a run prints per epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import RunConfig
from .data.splits import Data, fixed_subset
from .evaluation import clean_accuracy, pgd_accuracy


@dataclass
class MonitorSets:
    """The per-epoch evaluation images, already on the device (uint8)."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    test_subset_x: torch.Tensor
    test_subset_y: torch.Tensor
    train_subset_x: torch.Tensor
    train_subset_y: torch.Tensor


def monitor_sets(cfg: RunConfig, data: Data, device: torch.device) -> MonitorSets:
    """Evaluation images move to the device once, not batch by batch every epoch."""
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    test_idx = fixed_subset(len(test_y), cfg.monitor_n)
    train_idx = fixed_subset(len(data.train_y), cfg.monitor_n)  # streamed: all of them
    return MonitorSets(test_x, test_y, test_x[test_idx], test_y[test_idx],
                       data.train_x[train_idx].to(device), data.train_y[train_idx].to(device))


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
    return out


def epoch_line(run_path: str, row: dict[str, Any], epochs: int) -> str:
    parts = [f"{run_path} epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.3g}",
             f"loss {row['train_loss']:.3f}", f"test clean {row['test_clean_acc']:.2f}"]
    if "test_pgd_acc" in row:
        parts.append(f"test PGD {row['test_pgd_acc']:.2f} train PGD {row['train_pgd_acc']:.2f}")
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
