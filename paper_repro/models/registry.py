"""Model registry: name -> constructor, and the [0,1]-input wrapper every model is built into.

Pattern from timm (`_registry.py` / `_factory.py`): `@register_model(name)` files a constructor under
the name users type, and `create_model` is the single verb that builds one. Unlike timm the key is
given explicitly (model names such as `wrn-28-10` are not valid Python identifiers).

Every created model is an `ImageClassifier`: images arrive in [0,1] and normalisation is the model's
first layer (RobustBench style), so attacks and ε never see mean/std (baselines_spec §11.3).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from paper_repro.errors import ConfigError

__all__ = [
    "ImageClassifier",
    "Normalize",
    "PerImageStandardize",
    "create_model",
    "list_models",
    "register_model",
    "register_source",
]

Constructor = Callable[..., nn.Module]

# How the registered network expects its input to be normalised.
NORMALIZATIONS = ("mean-std", "per-image")


@dataclass(frozen=True)
class _Entry:
    constructor: Constructor
    normalization: str  # one of NORMALIZATIONS


# The only mutable module-level objects (STYLE §"Six habits" 6): filled by the family modules.
_MODELS: dict[str, _Entry] = {}
# Other libraries' architectures by prefix: "torchvision:resnet50" -> _SOURCES["torchvision"]
# ("resnet50", ...), filled by models/hub.py.
_SOURCES: dict[str, Constructor] = {}


def register_model(name: str, *, normalization: str = "mean-std") -> Callable[[Constructor], Constructor]:
    """Register `fn(num_classes, in_channels, **kwargs) -> nn.Module` under `name`.

    `normalization` is the entry's own input layer: "mean-std" (per-channel, from create_model's
    mean/std; Identity when they are None) or "per-image" (Madry's TF per-image standardisation,
    which is part of that architecture and so is used whatever mean/std are given).
    A duplicate name raises ValueError: silently replacing a model would change experiments.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def decorator(fn: Constructor) -> Constructor:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = _Entry(fn, normalization)
        return fn

    return decorator


def register_source(prefix: str) -> Callable[[Constructor], Constructor]:
    """Register `fn(name, *, num_classes, in_channels, mean, std, **kwargs) -> ImageClassifier`
    for the model names `<prefix>:<name>` (another library's architectures)."""

    def decorator(fn: Constructor) -> Constructor:
        if prefix in _SOURCES:
            raise ValueError(f"model source {prefix!r} is already registered")
        _SOURCES[prefix] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_MODELS)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean/std are buffers so they travel with the checkpoint."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class PerImageStandardize(nn.Module):
    """TF `per_image_standardization`: (x - mean_img) / max(std_img, 1/sqrt(numel_per_image)).

    Madry's cifar10_challenge applies it to 0-255 pixels inside the model (spec §2.4). The
    statistics are per image over all channels and positions; std is the population std.
    `input_scale` multiplies x first: the result is scale-invariant except for the 1/sqrt(N)
    floor, so input_scale=255 on [0,1] images reproduces the reference exactly (the floor only
    matters for near-constant images). input_scale=1 is the formula applied to [0,1] values.
    """

    def __init__(self, input_scale: float = 1.0) -> None:
        super().__init__()
        self.input_scale = float(input_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.input_scale
        flat = x.flatten(1)
        mean = flat.mean(dim=1)
        std = flat.var(dim=1, unbiased=False).sqrt()
        floor = 1.0 / math.sqrt(flat.shape[1])
        adjusted = torch.clamp(std, min=floor)
        return (x - mean.view(-1, 1, 1, 1)) / adjusted.view(-1, 1, 1, 1)

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale}"


class ImageClassifier(nn.Module):
    """A network plus its input normalisation: takes [0,1] images, returns logits.

    `net` exposes `.stem` (the first layer, a conv or a Linear on flattened images; YOPO's
    "layer one", whose output is z0),
    `.forward_features(x) -> [B, D]` and `.classifier` (nn.Linear).
    """

    def __init__(self, net: nn.Module, normalize: nn.Module | None = None) -> None:
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, D]; `net.classifier(features(x)) == forward(x)`."""
        return self.net.forward_features(self.normalize(x))

    @property
    def stem(self) -> nn.Module:
        return self.net.stem


def _check_kwargs(name: str, fn: Constructor, kwargs: dict[str, object]) -> None:
    """Refuse kwargs the constructor does not declare, naming the accepted ones (one line)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("num_classes", "in_channels")]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"model {name!r} got unknown option(s) {', '.join(unknown)}; accepted: {valid}")


def _make_normalize(
    name: str, entry: _Entry, in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> nn.Module:
    if entry.normalization == "per-image":
        # Part of the architecture (Madry TF model), so mean/std are deliberately ignored.
        # Madry feeds 0-255 pixels; scaling by 255 keeps the std floor identical to the reference.
        return PerImageStandardize(input_scale=255.0)
    if mean is None and std is None:
        return nn.Identity()
    if mean is None or std is None:
        raise ConfigError(f"model {name!r}: give both mean and std, or neither")
    mean, std = list(mean), list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(
            f"model {name!r}: mean/std need {in_channels} values (in_channels), "
            f"got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"model {name!r}: std must be positive, got {std}")
    return Normalize(mean, std)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: object,
) -> ImageClassifier:
    """Build the registered network `name` wrapped as an ImageClassifier taking [0,1] images.

    Keyword arguments set to None are dropped first, so a CLI default of None never overrides the
    model's own default (timm habit). Unknown names and unknown options raise ConfigError.

    Example:
        >>> model = create_model("wrn-28-10", num_classes=10, dropout=0.3,
        ...                      mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
        >>> model = create_model("cnn-small", num_classes=10, in_channels=1)
        >>> model = create_model("torchvision:resnet50", num_classes=10)  # the library's network
    """
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"model {name!r}: num_classes and in_channels must be >= 1")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    prefix, colon, library_name = name.partition(":")
    if colon:
        if prefix not in _SOURCES:
            raise ConfigError(f"unknown model source {prefix + ':'!r} in {name!r}; valid: "
                              f"{', '.join(p + ':<name>' for p in sorted(_SOURCES))}")
        return _SOURCES[prefix](library_name, num_classes=num_classes, in_channels=in_channels,
                                mean=mean, std=std, **kwargs)
    entry = _MODELS.get(name)
    if entry is None:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(list_models())}, "
                          "or torchvision:<name> / timm:<name>")
    _check_kwargs(name, entry.constructor, kwargs)
    normalize = _make_normalize(name, entry, in_channels, mean, std)
    net = entry.constructor(num_classes=num_classes, in_channels=in_channels, **kwargs)
    return ImageClassifier(net, normalize)
