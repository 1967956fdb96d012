"""One evaluation protocol for every row (DESIGN §7).

Clean accuracy on the full test set; PGD-k (k = 20 for the tables) at the table's ε with
α = ε/4, one random start, the model in eval mode, fp32, on a fixed subset of the test set
(the same images for every run; all of them at paper scale). Per-epoch monitoring uses the
same attack on fixed subsets of the test and the (un-augmented) training set.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attacks import pgd

_SUBSET_SEED = 20201224  # fixed: every run, every method evaluates the same images


def fixed_subset(total: int, n: int | None) -> torch.Tensor:
    """Indices of n images drawn once, independent of the run's seed."""
    if n is None or n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(_SUBSET_SEED)
    return torch.randperm(total, generator=g)[:n].sort().values


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device):
    for start in range(0, len(labels), batch):
        x = images[start:start + batch].to(device, non_blocking=True).float().div_(255)
        yield x, labels[start:start + batch].to(device, non_blocking=True)


@torch.no_grad()
def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   batch: int, device: torch.device) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in _batches(images, labels, batch, device):
        correct += (model(x).argmax(1) == y).sum()
    return 100.0 * correct.item() / max(len(labels), 1)


def pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                 alpha: float, steps: int, batch: int, device: torch.device) -> float:
    """Accuracy under L∞ PGD-`steps` with one random start, eval mode."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in _batches(images, labels, batch, device):
        x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps) if steps > 0 else x
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum()
    return 100.0 * correct.item() / max(len(labels), 1)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
             alpha: float, steps: int, n: int | None, batch: int, device: torch.device,
             seed: int = 0) -> dict[str, float]:
    """The table protocol: clean on all images, PGD on the fixed subset of n images."""
    torch.manual_seed(seed)  # the random start is part of the protocol: make it repeatable
    idx = fixed_subset(len(labels), n)
    return {
        "clean_acc": clean_accuracy(model, images, labels, batch=batch, device=device),
        "pgd_acc": pgd_accuracy(model, images[idx], labels[idx], eps=eps, alpha=alpha,
                                steps=steps, batch=batch, device=device),
        "eval_n": int(len(idx)),
        "eval_steps": steps,
    }
