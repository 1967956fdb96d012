"""Pre-activation ResNet-18 in the two wirings the baselines use (baselines_spec §8.1, §6.1, §11.10).

- `preact-resnet18`: Fast AT's copy (locuslab/fast_adversarial CIFAR10/preact_resnet.py). The 1x1
  projection shortcut is applied to the RAW block input x; head ReLU(BN) -> pool -> Linear.
- `preact-resnet18-yopo`: YOPO's copy (a1600012888/YOPO-You-Only-Propagate-Once network.py). The
  shortcut conv sees the activated input ReLU(BN(x)) and there is no final BN-ReLU before pooling
  (1,024 fewer parameters). Rice et al.'s copy shares YOPO's shortcut but keeps the final BN.

Same parameter shapes (apart from YOPO's missing BN), different functions: mixing them up changes
results without any shape error. PyTorch default init, as in the references.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from paper_repro.models.registry import register_model

__all__ = ["PreActBlock", "PreActResNet"]

ShortcutFrom = Literal["input", "activated"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a shortcut.

    `shortcut_from` says what the 1x1 projection (when stride or channels change) sees:
    "input" = raw x (Fast AT), "activated" = ReLU(BN1(x)) (Rice, YOPO). An identity shortcut
    always adds the raw x.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut_from: ShortcutFrom) -> None:
        super().__init__()
        self.shortcut_from = shortcut_from
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        elif self.shortcut_from == "input":
            shortcut = self.shortcut(x)
        else:
            shortcut = self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + shortcut


class PreActResNet(nn.Module):
    """Stem conv3x3 -> 64, four stages of PreActBlocks (64/128/256/512, strides 1/2/2/2),
    optional final ReLU(BN), global average pool, Linear with bias."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        shortcut_from: ShortcutFrom = "input",
        final_bn: bool = True,
    ) -> None:
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers = []
        in_planes = 64
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, planes, stride, shortcut_from))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        # YOPO drops the final BN-ReLU: the last block's sum goes straight to the pool.
        self.bn = nn.BatchNorm2d(512) if final_bn else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        o = self.stem(x)
        o = self.layer4(self.layer3(self.layer2(self.layer1(o))))
        if self.bn is not None:
            o = F.relu(self.bn(o))
        return self.pool(o).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3) -> PreActResNet:
    """Fast AT's PreActResNet18 (shortcut on raw x, final BN-ReLU): 11,172,170 params."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, shortcut_from="input", final_bn=True)


@register_model("preact-resnet18-yopo")
def preact_resnet18_yopo(num_classes: int, in_channels: int = 3) -> PreActResNet:
    """YOPO's PreActResNet18 (shortcut on activated x, no final BN-ReLU): 11,171,146 params."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, shortcut_from="activated", final_bn=False)
