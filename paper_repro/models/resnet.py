"""ResNet-50 for ImageNet: torchvision's network, as used by Free AT ImageNet
(mahyarnajibi/FreeAdversarialTraining) and Fast AT ImageNet (locuslab/fast_adversarial).

Unlike the CIFAR pre-activation networks this is the post-activation torchvision ResNet
(7x7/2 stem conv + max-pool, Bottleneck blocks). It is exactly `torchvision.models.resnet50(
weights=None, num_classes=...)`; the subclass only adds the `stem` / `forward_features` /
`classifier` interface as aliases, so state_dict keys stay torchvision's and its checkpoints load.
Weights are never downloaded here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from paper_repro.models.registry import register_model

__all__ = ["ResNet50"]


class ResNet50(ResNet):
    """torchvision ResNet-50 (same modules, init and keys) with the suite's model interface."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        # Same call as torchvision.models.resnet50(weights=None, num_classes=num_classes).
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    @property
    def stem(self) -> nn.Conv2d:
        """The first conv (`conv1`); a property, not a second registered module, so keys stay unique."""
        return self.conv1

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int = 3) -> ResNet50:
    """torchvision ResNet-50, randomly initialised: 25,557,032 params at 1000 classes."""
    return ResNet50(num_classes, in_channels)
