"""The one interface every training method implements, and the registry that names them.

A method is a small class registered under its key (the key equals its file name in
`baselines/`, e.g. `fast_at`). It declares a dataclass of its own settings whose defaults
are its reference recipe, and a `recipe` of run-level defaults (optimiser, schedule, epochs,
architecture). The runner hands it a `Context` and calls `train_epoch(ctx)` once per epoch.
A method never builds data, models, loggers or evaluation and never writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Protocol

import torch
import torch.nn as nn

from .. import faults
from ..config import RunConfig, coerce
from ..experiment import Experiment, row_config
from ..data import ArrayLoader
from ..errors import ConfigError
from .schedules import Schedule

_METHODS: dict[str, type["Method"]] = {}
# The plug-ins that register methods, by module name: data, imported on the first look-up, so
# that core never imports a plug-in (baselines/ imports core). Importing `baselines` imports
# every file in it (baselines/__init__.py). REPRO_PLUGINS (comma-separated module names) adds
# methods kept outside this repository; the pool's and SLURM's jobs inherit it with the
# environment.
PLUGINS: tuple[str, ...] = ("baselines",)
PLUGINS_ENV = "REPRO_PLUGINS"
ATTACK_PASS_KINDS = ("compiled", "eager", None)  # `Method.attack_passes`


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: registers `cls` under `cls.name`."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method '{cls.name}' registered twice")
    if cls.attack_passes not in ATTACK_PASS_KINDS:
        raise ValueError(f"method '{cls.name}': attack_passes must be one of "
                         f"{ATTACK_PASS_KINDS}, got {cls.attack_passes!r}")
    _METHODS[cls.name] = cls
    return cls


def plugin_modules() -> tuple[str, ...]:
    """`PLUGINS`, then the modules REPRO_PLUGINS names."""
    extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return PLUGINS + tuple(m for m in extra if m not in PLUGINS)


def _load_builtins() -> None:
    for module in plugin_modules():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if module in PLUGINS or e.name not in (module, module.split(".")[0]):
                raise  # a broken install, or the plug-in imports something missing
            raise ConfigError(f"{PLUGINS_ENV}: no module '{module}' on the Python path "
                              f"(set PYTHONPATH to the folder that holds it)") from None


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> type["Method"]:
    _load_builtins()
    if name not in _METHODS:
        raise ConfigError(f"unknown method '{name}' (valid: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def resolve_row(exp: Experiment, row_id: str, scale: str, *, seed: int = 0,
                overrides: Mapping[str, Any] | None = None,
                controlled_arch: str | None = None) -> RunConfig:
    """The frozen config of one experiment row at one scale, on top of its method's recipe
    from this registry (`experiment.row_config` says the order of the layers)."""
    return row_config(exp, row_id, scale, lambda method: get_method(method).recipe, seed=seed,
                      overrides=overrides, controlled_arch=controlled_arch)


@dataclass(frozen=True)
class NoSettings:
    """For methods without settings of their own."""


class Meter:
    """Loss and accuracy summed on the device; one host sync per epoch, in `result()`."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0

    def update(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        self.loss += loss.detach().double() * y.numel()
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.count += y.numel()

    def result(self, prefix: str = "train") -> dict[str, float]:
        n = max(self.count, 1)
        return {f"{prefix}_loss": self.loss.item() / n, f"{prefix}_acc": 100.0 * self.correct.item() / n}


@dataclass
class Context:
    """What the runner hands a method for one epoch; the model arrives in train mode (a method
    that attacks in eval mode, as TRADES, sets it itself, and train mode again to update)."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedule: Schedule
    loader: ArrayLoader
    cfg: RunConfig
    device: torch.device
    epoch: int
    steps_per_epoch: int
    global_step: int = 0
    lr_log: list[float] = dataclasses.field(default_factory=list)  # the LR of every step taken
    stop_reason: str | None = None  # set by `request_stop`: the runner ends training after this epoch
    # data parallel (paper_repro.runtime.distributed): the loader yields this rank's slice of each
    # batch; the runner sets these two so that a method never talks to the other ranks itself
    average_gradients: Callable[[list[torch.optim.Optimizer]], None] | None = None
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # the global batch's tensor

    @property
    def eps(self) -> float:
        """The training threat model: `train_eps` when set, else the evaluated `eps`."""
        return self.cfg.eps if self.cfg.train_eps is None else self.cfg.train_eps

    @property
    def done(self) -> bool:
        """True once `max_steps` optimiser steps have been taken (methods stop their loop)."""
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def request_stop(self, reason: str) -> None:
        """End training after this epoch (e.g. Fast AT's catastrophic-overfitting guard)."""
        self.stop_reason = reason

    @property
    def progress(self) -> float:
        """Training progress in epochs of optimiser steps, the schedules' clock."""
        return self.global_step / self.steps_per_epoch

    def current_lr(self) -> float:
        return self.schedule.lr(self.progress)

    def step(self, optimizers: list[torch.optim.Optimizer] | None = None) -> None:
        """Set this iteration's LR (and momentum), step, zero the gradients, count the step."""
        t = self.progress
        lr = self.schedule.lr(t)
        self.lr_log.append(lr)
        momentum = self.schedule.momentum(t) if self.schedule.momentum else None
        if self.average_gradients is not None:  # all ranks step on the global batch's gradient
            self.average_gradients(optimizers or self.optimizers)
        for opt in optimizers or self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if momentum is not None:
                    if "betas" in group:
                        group["betas"] = (momentum, group["betas"][1])
                    else:
                        group["momentum"] = momentum
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.global_step += 1
        faults.point("pretrain-step" if self.cfg.experiment == "pretrain" else "step")  # tests


class Objective(Protocol):
    """An adversarial training objective: how x_adv is found, and the loss trained on it.

    PGD AT's CE on x_adv, TRADES's and MART's losses implement it; AWP wraps any of them
    (`baselines/awp.py`), and AFT fine-tunes with any of them (`baselines/aft.py`).
    """

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps: float) -> torch.Tensor:
        """x_adv; sets the model mode it attacks in (the update always runs in train mode)."""

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the scalar training loss, the logits on x_adv the meter scores)."""


# Around an update's forward and backward: (model, the update's loss as a function of a model)
UpdateWrapper = Callable[[nn.Module, Callable[[nn.Module], torch.Tensor]], ContextManager]


def objective_epoch(ctx: Context, objective: Objective,
                    wrap: UpdateWrapper | None = None) -> dict[str, float]:
    """One epoch of adversarial training: per minibatch, craft x_adv, then one optimiser step
    on the objective's loss in train mode. `wrap` (AWP's weight perturbation) encloses the
    update's forward and backward and is left before the step."""
    model, meter = ctx.model, Meter(ctx.device)
    for batch in ctx.loader:
        x, y = batch.x, batch.y
        x_adv = objective.attack(model, x, y, ctx.eps)
        model.train()
        around = wrap(model, lambda m: objective.loss(m, x, x_adv, y)[0]) if wrap \
            else contextlib.nullcontext()
        with around:
            loss, logits = objective.loss(model, x, x_adv, y)
            loss.backward()
        ctx.step()
        meter.update(logits, y, loss)
        if ctx.done:
            break
    return meter.result()


def parameter_groups(model: nn.Module, weight_decay: float, scope: str) -> list[dict[str, Any]]:
    """Split parameters for weight decay: all of them, conv/linear weights only (TF `DW`), or no BN."""
    if scope == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
            if scope == "weights":
                wants = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            else:  # "no_bn"
                wants = not is_bn
            (decay if wants else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: Any, cfg: RunConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Method:
    """Base class: one epoch of training, driven by the runner."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    recipe: ClassVar[dict[str, Any]] = {}
    fine_tunes: ClassVar[bool] = False  # starts from a pre-training run (`pretrain`) or `init`
    needs_arrays: ClassVar[bool] = False  # reads the in-memory training set (not streamed data)
    marker: ClassVar[str] = "o"  # its matplotlib marker in the Pareto figures (report/figures.py)
    # Where its attack-only passes run, for the fast-path checks (perf/probes.py, tests):
    # "compiled" through the model (every attack built on attacks.input_gradient), "eager"
    # outside the compiled model (YOPO's layer-one steps call the stem directly), or None: it
    # has none (every forward/backward also updates the weights: natural, Free AT).
    attack_passes: ClassVar[str | None] = "compiled"
    # True when an epoch is PGD-k AT's step with PGDSettings (training/adversarial.py), so that
    # `bench --baseline-loop` can time the reference repositories' loop beside it.
    pgd_at_step: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.settings = self.make_settings(cfg.method_args)

    @classmethod
    def make_settings(cls, args: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls.Settings)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"method '{cls.name}': unknown setting(s) {', '.join(unknown)} "
                              f"(valid: {', '.join(sorted(known)) or 'none'})")
        try:
            hints = typing.get_type_hints(cls.Settings)
        except NameError:  # an annotation that cannot be resolved here: let the class check
            hints = {}
        try:
            return cls.Settings(**{k: coerce(f"method_args.{k}", hints[k], v) if k in hints
                                   else v for k, v in args.items()})
        except ConfigError as e:
            raise ConfigError(f"method '{cls.name}': {e}") from None

    def make_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        groups = parameter_groups(model, self.cfg.weight_decay, self.cfg.wd_scope)
        return [make_optimizer(groups, self.cfg)]

    def optimizer_steps_per_epoch(self, batches: int) -> int:
        """Optimiser steps in one epoch (Free AT replays each batch m times)."""
        return batches

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State carried across batches/epochs (Free AT's δ, ATTA's stored images)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
