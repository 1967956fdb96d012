"""The GPU fast path, in one place: precision, memory format and compilation of a run.

Every method trains through the runner, which (1) prepares the model once with `prepare_model`
and (2) runs each training epoch inside `autocast`. Nothing else in the suite knows about
precision; the methods and the attack code are the same in fp32 and bf16.

- **bf16 autocast** (`precision`: "auto" = bf16 on CUDA, fp32 elsewhere; an explicit "bf16" is
  honoured on the CPU too, with CPU autocast: that is how tests/test_fastpath_methods.py runs
  the GPU's numerics on a CPU). Autocast casts only
  the model's convolutions and matmuls; the images x, the perturbation δ, the projection and
  clamp arithmetic and the losses stay fp32 (attacks take `logits.float()`). The first conv
  (the stem) runs outside autocast in fp32, so x + δ reaches the network unquantised: at pixel
  values in [0.5, 1) the bf16 spacing 2⁻⁸ is half of a 2/255 PGD step. The stem is <0.01% of a
  WRN's FLOPs (performance.md §8.2). bf16 has fp32's exponent range, so no loss scaler.
- **channels_last** (`channels_last`: None = on with CUDA): the conv weights become NHWC; cuDNN
  then runs every conv NHWC, which tensor cores prefer.
- **torch.compile** (`compile`, `--compile`): compiled in place (`nn.Module.compile`), so the
  state-dict keys, `model.stem` and checkpoints are unchanged. The backend is inductor;
  `prepare_model(backend=...)` takes another (tests: "aot_eager"; the benchmark: a recording
  wrapper around inductor, `probes.CompiledGraphProbe`). Attacks freeze the parameters
  (`attacks.frozen_parameters`), so the compiled attack graph has no weight gradients
  (pytorch#132929); dynamo compiles that graph once next to the training one.
- Evaluation (`evaluation.py`) runs outside `autocast`: the table protocol stays fp32.

With precision fp32, channels_last off and compile off (the CPU defaults) every function here
is the identity, so CPU numerics are bit-identical to a run without the fast path.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..config import RunConfig

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_RECOMPILE_LIMIT = 64  # train/eval BN × attack/update × autocast on/off × last-batch shapes
COMPILE_BACKEND = "inductor"


def resolve_precision(cfg: RunConfig, device: torch.device) -> str:
    """"fp32" or "bf16": auto means bf16 on CUDA (tensor cores), fp32 elsewhere."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def uses_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.channels_last is None else cfg.channels_last


def describe(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The resolved fast-path settings, for the run's record."""
    return {"precision": resolve_precision(cfg, device),
            "channels_last": uses_channels_last(cfg, device), "compiled": cfg.compile}


def autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The training-epoch context: bf16 autocast of convs/matmuls, or nothing at all in fp32."""
    if resolve_precision(cfg, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, cfg: RunConfig, device: torch.device, *,
                  backend: str | Callable[..., Any] | None = None) -> nn.Module:
    """Apply channels_last, the fp32 stem and compilation to `model` in place; returns it.

    `backend` is torch.compile's (None: `COMPILE_BACKEND`, inductor); only used with cfg.compile.
    """
    if uses_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    if resolve_precision(cfg, device) != "fp32":
        stem = getattr(model, "stem", None)
        if isinstance(stem, nn.Module):
            run_in_fp32(stem)
    if cfg.compile:
        import torch._dynamo.config as dynamo_config

        # Each (BN mode, frozen parameters, autocast state, batch shape) is its own graph.
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, _RECOMPILE_LIMIT)
        model.compile(backend=backend or COMPILE_BACKEND, dynamic=False)
    return model


def run_in_fp32(module: nn.Module) -> None:
    """Make `module` compute in fp32 even under autocast; its output returns to the autocast dtype.

    Why: the stem sees x + δ. Computing it in fp32 keeps every PGD step visible to the network;
    casting its output back keeps the rest of the network (residual adds included) in bf16.
    The override is an instance attribute: parameters and state-dict keys are untouched.
    """
    if getattr(module, "_fastpath_fp32", False):
        return
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return inner(x)
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            return inner(x.float()).to(dtype)

    module.forward = forward
    module._fastpath_fp32 = True


@contextlib.contextmanager
def eager(cfg: RunConfig) -> Iterator[None]:
    """Run compiled code eagerly in this block (FLOP counting dispatches every op itself)."""
    if not cfg.compile:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (wall-clock timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
