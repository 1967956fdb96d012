"""The one checkpoint format: what is saved each epoch, how a torn file is detected (torch's
per-record CRCs, which `torch.load` itself does not check) and the previous one used instead,
and how a run is restored from it. Model weights alone load through models/weights.py.

A run with a validation split also keeps `best.pt`: the weights of its epoch with the highest
validation PGD accuracy (ties: the earliest), written with the same atomic, CRC-checked save
(the best before it stays as best.prev.pt). The checkpoint's state names that epoch, so a
resumed run keeps its best-so-far; `reconcile_best` puts best.pt back in step with it after a
kill between the two writes."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..config import RunConfig
from ..errors import CheckpointError
from . import files
from .files import safe_load


class MethodState(Protocol):
    """What a checkpoint keeps of a training method (training.methods.Method): the state it
    carries across batches. A protocol, so that the store never imports training."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingState:
    """Where a run stands, besides its weights, optimisers and method state: saved in every
    checkpoint, so that a resumed run continues exactly where the killed one stopped."""

    epoch: int = 0
    global_step: int = 0
    train_time_s: float = 0.0
    flops_per_epoch: int | None = None  # counted once, on the first epoch
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    lr_log: list[float] = field(default_factory=list)  # the LR of every optimiser step
    stop_reason: str | None = None  # a method's own early stop (Fast AT's catastrophic check)
    best_epoch: int | None = None   # the epoch best.pt holds (validation split only)
    best_score: float | None = None  # its validation PGD accuracy

    def improves(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch`'s validation score; True when it is the new best (strictly
        higher, so ties keep the earliest epoch)."""
        if self.best_score is not None and not score > self.best_score:
            return False
        self.best_epoch, self.best_score = epoch, float(score)
        return True


BEST_FILE = "best.pt"


def save_checkpoint(path: Path, cfg: RunConfig, model: nn.Module,
                    optimizers: list[torch.optim.Optimizer], method: MethodState,
                    state: TrainingState) -> None:
    """Atomically; the previous checkpoint is kept as checkpoint.prev.pt (files.py)."""
    files.atomic_torch_save({
        "config_hash": cfg.config_hash(),
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "method": method.state_dict(),
        "epoch": state.epoch, "global_step": state.global_step,
        "train_time_s": state.train_time_s, "flops_per_epoch": state.flops_per_epoch,
        "metrics": state.metrics, "lr_log": state.lr_log,
        "stop_reason": state.stop_reason,
        "best_epoch": state.best_epoch, "best_val_pgd_acc": state.best_score,
    }, path)


def save_best(path: Path, cfg: RunConfig, model: nn.Module, state: TrainingState) -> None:
    """best.pt: the weights of `state.best_epoch` (the epoch just ended), with its epoch and
    validation scores."""
    row = state.metrics[-1] if state.metrics else {}
    files.atomic_torch_save({"config_hash": cfg.config_hash(), "model": model.state_dict(),
                               "epoch": state.best_epoch, "val_pgd_acc": state.best_score,
                               "val_clean_acc": row.get("val_clean_acc")}, path)


def read_best(path: Path) -> dict[str, Any] | None:
    """best.pt (or best.prev.pt) if it is there and whole, read with weights_only; else None."""
    if not path.is_file() or files.check_checkpoint(path) is not None:
        return None
    try:
        best = safe_load(path)
    except CheckpointError:
        return None
    return best if isinstance(best, dict) and "model" in best and "epoch" in best else None


def reconcile_best(directory: Path, state: TrainingState) -> None:
    """Make best.pt the weights of the checkpoint's best epoch. best.pt is written before the
    checkpoint, so after a kill between the two it may hold an epoch the checkpoint never saw;
    then the best before it (best.prev.pt) is the one the checkpoint names."""
    path = directory / BEST_FILE
    previous = files.previous_checkpoint(path)
    if state.best_epoch is None:
        path.unlink(missing_ok=True)
        previous.unlink(missing_ok=True)
        return
    for candidate in (path, previous):
        best = read_best(candidate)
        if best is not None and best["epoch"] == state.best_epoch:
            if candidate != path:
                os.replace(candidate, path)
            return
    raise CheckpointError(f"{path}: the checkpoint's best epoch is {state.best_epoch}, but "
                          f"neither {path.name} nor {previous.name} holds it; remove the "
                          "run's folder to train it again")


def load_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The newest whole checkpoint of the run: checkpoint.pt, or if that one is torn the
    previous good one (checkpoint.prev.pt, with a warning); None when there is neither."""
    torn: list[str] = []
    for candidate in (path, files.previous_checkpoint(path)):
        if not candidate.is_file():
            continue
        why = files.check_checkpoint(candidate)
        ckpt: Any = None
        if why is None:
            try:
                ckpt = safe_load(candidate)
            except CheckpointError as e:
                why = str(e)
        if why is None and not (isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt):
            why = "not a checkpoint of this suite"
        if why is not None:
            torn.append(f"{candidate.name}: {why}")
            continue
        if ckpt.get("config_hash") != cfg.config_hash():
            raise CheckpointError(f"{candidate}: written by another config (hash "
                                  f"{ckpt.get('config_hash')} != {cfg.config_hash()})")
        if torn:
            print(f"warning: {torn[0]}; resuming from {candidate.name} (epoch {ckpt['epoch']})",
                  file=sys.stderr)
        return ckpt
    if torn:
        raise CheckpointError(f"no usable checkpoint in {path.parent} ({'; '.join(torn)}); "
                              "remove them to start the run over")
    return None


def restore(ckpt: dict[str, Any], model: nn.Module, optimizers: list[torch.optim.Optimizer],
            method: MethodState, device: torch.device) -> TrainingState:
    """Put the weights, optimiser and method state back; return where the run stood."""
    model.load_state_dict(ckpt["model"])
    for opt, opt_state in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(opt_state)
    method.load_state_dict(_to_device(ckpt["method"], device))
    return TrainingState(epoch=ckpt["epoch"], global_step=ckpt["global_step"],
                         train_time_s=ckpt["train_time_s"],
                         flops_per_epoch=ckpt["flops_per_epoch"], metrics=ckpt["metrics"],
                         lr_log=ckpt["lr_log"], stop_reason=ckpt.get("stop_reason"),
                         best_epoch=ckpt.get("best_epoch"),  # absent before validation splits
                         best_score=ckpt.get("best_val_pgd_acc"))


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
