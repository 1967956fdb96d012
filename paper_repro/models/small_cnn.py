"""Small CNNs for the cpu and smoke scales (Fashion-MNIST 28x28x1; also run on 32x32x3).

Not from a reference repository: these are the suite's own stand-ins for the CIFAR/ImageNet
networks (DESIGN §2). `cnn-small` has one conv per stage (16/32 channels, 128 features),
`cnn-medium` two (32/64 channels, 256 features) for an over-fitting regime at cpu scale.
The stem is a plain first conv so YOPO's layer-one update applies unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from paper_repro.errors import ConfigError
from paper_repro.models.registry import register_model

__all__ = ["SmallCNN"]


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=False)]


class SmallCNN(nn.Module):
    """Two stages of [conv3x3-BN-ReLU] x convs_per_stage + max-pool 2, then adaptive avg-pool to
    4x4 (so 28x28 and 32x32 inputs give the same feature size), Linear-ReLU (features), Linear."""

    def __init__(
        self, num_classes: int, in_channels: int, width: int, convs_per_stage: int, hidden: int
    ) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"width must be >= 1, got {width}")
        w1, w2 = width, 2 * width
        self.stem = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        layers: list[nn.Module] = _bn_relu(w1)
        for _ in range(convs_per_stage - 1):
            layers += [nn.Conv2d(w1, w1, 3, padding=1, bias=False), *_bn_relu(w1)]
        layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(w1, w2, 3, padding=1, bias=False), *_bn_relu(w2)]
        for _ in range(convs_per_stage - 1):
            layers += [nn.Conv2d(w2, w2, 3, padding=1, bias=False), *_bn_relu(w2)]
        layers += [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4), nn.Flatten(1)]
        layers += [nn.Linear(w2 * 16, hidden), nn.ReLU(inplace=False)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@register_model("cnn-small")
def cnn_small(num_classes: int, in_channels: int = 3, width: int = 16) -> SmallCNN:
    """conv(width)-pool, conv(2*width)-pool, 4x4 pool, Linear(->128): the smoke/cpu default."""
    return SmallCNN(num_classes, in_channels, width, convs_per_stage=1, hidden=128)


@register_model("cnn-medium")
def cnn_medium(num_classes: int, in_channels: int = 3, width: int = 32) -> SmallCNN:
    """[conv(width)]x2-pool, [conv(2*width)]x2-pool, 4x4 pool, Linear(->256): more capacity."""
    return SmallCNN(num_classes, in_channels, width, convs_per_stage=2, hidden=256)
