"""The process a run computes in: which device, whether kernels are deterministic, and the seed
of every epoch, so that a resumed run draws exactly what the uninterrupted one drew."""
from __future__ import annotations

import os
import random

import torch

from ..config import RunConfig
from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device '{name}' (valid: auto, cpu, cuda, "
                          "cuda:<index>)") from None


def set_determinism(cfg: RunConfig) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def seed_epoch(cfg: RunConfig, epoch: int, rank: int = 0) -> None:
    """Every source of randomness of epoch e is a function of (seed, e): resume is exact.
    Data-parallel ranks > 0 draw their own streams (attack starts differ per slice)."""
    s = cfg.seed * 100_003 + epoch + rank * 1_000_000_007
    torch.manual_seed(s)
    random.seed(s)
