"""Fully connected stand-ins for the regime search (DESIGN §2, experiments/regime.toml).

Why an MLP: small CNNs on 1k-10k Fashion-MNIST images do not robustly over-fit under PGD AT,
while an MLP 784-1024-1024-10 on 1,000 images does (PGD train 84% vs test 55% after 200
epochs, test robustness peaking at epoch 60 and falling). Capacity to spare relative to the
data is what opens the gap that AFT's argument rests on.

The input is flattened. Its first Linear is the `stem` (YOPO's "layer one"), so every Table 1
method trains it unchanged; it flattens its own input, so `stem(normalize(x))` takes images.
Normalisation stays outside, in the registry's wrapper, as for every model.
"""

from __future__ import annotations

from torch import Tensor, nn

from paper_repro.errors import ConfigError
from paper_repro.models.registry import register_model

__all__ = ["MLP", "FlatLinear"]


class FlatLinear(nn.Linear):
    """A Linear layer on flattened images: [B, C, H, W] -> [B, out_features]."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ConfigError(f"mlp: built for {self.in_features} input values per image, got "
                              f"{x.shape[1]}; set model_args.image_size to the images' side")
        return super().forward(x)


class MLP(nn.Module):
    """stem FlatLinear-ReLU, then (depth - 1) x [Linear-ReLU] (features), then Linear."""

    def __init__(self, num_classes: int, in_features: int, width: int, depth: int) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ConfigError(f"mlp: width and depth must be >= 1, got width={width}, "
                              f"depth={depth}")
        self.stem = FlatLinear(in_features, width)
        layers: list[nn.Module] = [nn.ReLU(inplace=False)]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU(inplace=False)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@register_model("mlp")
def mlp(num_classes: int, in_channels: int = 3, width: int = 1024, depth: int = 2,
        image_size: int = 28) -> MLP:
    """`depth` hidden layers of `width` units on flattened image_size² x in_channels inputs
    (default 784-1024-1024-10 on Fashion-MNIST; image_size=32 for CIFAR)."""
    if image_size < 1:
        raise ConfigError(f"mlp: image_size must be >= 1, got {image_size}")
    return MLP(num_classes, in_channels * image_size * image_size, width, depth)
