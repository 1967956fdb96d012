"""Architectures from torchvision and timm by name: `torchvision:<name>`, `timm:<name>`.

`create_model("torchvision:resnet50", num_classes=10)` builds the library's network, randomly
initialised, behind the suite's [0,1]-input interface (`HubClassifier`). Weights come separately,
from `--init` (paper_repro/models/pretrained.py), so that every init form (a library's pretrained
weights, a file, a run) loads through one path. The network keeps the library's own module names,
so its state dict is the library's state dict under `net.`.

The library networks do not have the suite's `stem` / `forward_features` / `classifier` names;
`HubClassifier` finds them instead: the head is timm's `get_classifier()`, else a `classifier`
attribute that is a Linear, else the last Linear (torchvision: `fc`, `classifier.N`,
`heads.head`); the stem is the first Conv2d; the features are the head's input.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from paper_repro.errors import ConfigError
from paper_repro.models.registry import ImageClassifier, _Entry, _make_normalize, register_source

__all__ = ["HubClassifier", "classifier_name", "create_timm", "create_torchvision"]


def classifier_name(net: nn.Module) -> str:
    """The dotted name of the network's final Linear (its classifier head)."""
    head = None
    if hasattr(net, "get_classifier"):  # timm
        head = net.get_classifier()
    if not isinstance(head, nn.Linear) and isinstance(getattr(net, "classifier", None), nn.Linear):
        head = net.classifier  # the suite's own networks
    if not isinstance(head, nn.Linear):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    for name, module in net.named_modules():
        if module is head:
            return name
    raise ConfigError(f"{type(net).__name__}: no Linear classifier head found")


class HubClassifier(ImageClassifier):
    """A torchvision/timm network plus its input normalisation: [0,1] images in, logits out."""

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, D]: the input of the classifier head, caught by a hook."""
        head = self.net.get_submodule(classifier_name(self.net))
        caught: list[Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
        try:
            self.forward(x)
        finally:
            hook.remove()
        return caught[0].flatten(1)

    @property
    def stem(self) -> nn.Conv2d:
        return next(m for m in self.net.modules() if isinstance(m, nn.Conv2d))


def _wrap(name: str, net: nn.Module, in_channels: int, mean: Sequence[float] | None,
          std: Sequence[float] | None) -> HubClassifier:
    normalize = _make_normalize(name, _Entry(lambda **_: net, "mean-std"), in_channels, mean, std)
    return HubClassifier(net, normalize)


@register_source("torchvision")
def create_torchvision(name: str, *, num_classes: int, in_channels: int = 3,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       **kwargs: object) -> HubClassifier:
    """`torchvision.models.get_model(name, weights=None, num_classes=...)`, randomly initialised."""
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError(f"unknown torchvision model {name!r} "
                          "(see torchvision.models.list_models())")
    if in_channels != 3:
        raise ConfigError(f"torchvision:{name} takes 3-channel images; the dataset has "
                          f"{in_channels}")
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"torchvision:{name}: bad model option(s) {sorted(kwargs)} ({e})") from None
    return _wrap(f"torchvision:{name}", net, in_channels, mean, std)


@register_source("timm")
def create_timm(name: str, *, num_classes: int, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                **kwargs: object) -> HubClassifier:
    """`timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)`."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                in_chans=in_channels, **kwargs)
    except TypeError as e:
        raise ConfigError(f"timm:{name}: bad model option(s) {sorted(kwargs)} ({e})") from None
    return _wrap(f"timm:{name}", net, in_channels, mean, std)
