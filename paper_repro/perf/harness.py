"""One method's training step outside the runner, on synthetic data of the dataset's shape (or
given images): the method's reference recipe on a given network and batch (`bench_config`),
then its model, optimisers and schedule driven pass by pass (`Bench`). `bench` times it,
`plan` counts its FLOPs, `gpucheck` trains an epoch with it, and the fast-path and model tests
drive every method through it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from ..config import RunConfig, build_config
from ..data import Augment, ArrayLoader, dataset_info
from ..runtime import fastpath
from ..training.methods import Context, Method, get_method
from ..training.schedules import make_schedule


def bench_config(method: str, arch: str, batch: int, *, dataset: str = "cifar10",
                 device: str = "auto", precision: str = "auto",
                 channels_last: bool | None = None, compile: bool = False,
                 model_args: dict | None = None) -> RunConfig:
    """The method's reference recipe on `arch` at batch `batch` (fast-path settings as given)."""
    recipe = get_method(method).recipe
    values = dict(dataset=dataset, arch=arch, batch_size=batch, drop_last=True, device=device,
                  precision=precision, channels_last=channels_last, compile=compile,
                  model_args=model_args or {})
    return build_config(("method recipe", recipe), ("bench", values), experiment="bench",
                        row=method, scale="paper", seed=0, method=method)


@dataclasses.dataclass
class Bench:
    """A method, its model, optimisers and schedule, and a synthetic training set on the device."""

    cfg: RunConfig
    device: torch.device
    method: Method
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    loader: ArrayLoader
    replays: int  # optimiser steps per minibatch (Free AT: m)
    global_step: int = 0
    epoch: int = 0

    def context(self, max_batches: int | None = None, max_steps: int | None = None) -> Context:
        """A Context for one pass over at most `max_batches` minibatches (or `max_steps`
        optimiser steps: Free AT takes `replays` per minibatch)."""
        if max_batches is not None:
            max_steps = max_batches * self.replays
        cfg = self.cfg if max_steps is None else \
            dataclasses.replace(self.cfg, max_steps=self.global_step + max_steps)
        schedule = make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs,
                                 **cfg.schedule_args)
        return Context(model=self.model, optimizers=self.optimizers, schedule=schedule,
                       loader=self.loader, cfg=cfg, device=self.device, epoch=self.epoch,
                       steps_per_epoch=len(self.loader) * self.replays,
                       global_step=self.global_step)

    def run(self, epoch_fn: Callable[[Context], dict[str, float]],
            max_batches: int | None = None, *, max_steps: int | None = None) -> dict[str, float]:
        """One (possibly partial) epoch of `epoch_fn` under the fast path's autocast."""
        ctx = self.context(max_batches, max_steps)
        with fastpath.autocast(self.cfg, self.device):
            stats = epoch_fn(ctx)
        self.global_step, self.epoch = ctx.global_step, self.epoch + 1
        return stats


def make_bench(cfg: RunConfig, steps: int, seed: int = 0,
               data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Bench:
    """Model, method and `steps` minibatches of synthetic data of the dataset's shape (or the
    given uint8 images and labels: `gpucheck` trains on learnable ones)."""
    from ..runtime.environment import resolve_device, set_determinism
    from ..models import build_model

    device = resolve_device(cfg.device)
    set_determinism(cfg)  # cuDNN autotuning on (the default for non-deterministic runs)
    info = dataset_info(cfg.dataset)
    if data is None:
        g = torch.Generator().manual_seed(seed)
        n = cfg.batch_size * steps
        data = (torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g,
                              dtype=torch.uint8),
                torch.randint(0, info.num_classes, (n,), generator=g))
    images, labels = data
    loader = ArrayLoader(images, labels, batch_size=cfg.batch_size, shuffle=True,
                         augment=Augment(pad=cfg.augment_pad, pad_mode=cfg.augment_pad_mode,
                                         pad_value=cfg.augment_pad_value, flip=cfg.augment_flip),
                         drop_last=cfg.drop_last, device=device, seed=seed)
    torch.manual_seed(seed)
    method = get_method(cfg.method)(cfg)
    model = build_model(cfg, info).to(device)
    optimizers = method.make_optimizers(model)
    return Bench(cfg, device, method, model, optimizers, loader,
                 replays=method.optimizer_steps_per_epoch(1))
