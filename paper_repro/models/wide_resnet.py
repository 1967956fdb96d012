"""Wide residual networks: WRN-28-10, WRN-34-10 and Madry's WRN-32-10.

Three different networks that are easy to mix up (baselines_spec §8.2, §2.4, §11.10):

- `wrn-28-10`: the official WRN (szagoruyko/wide-residual-networks, Lua). Pre-activation
  `wide_basic` blocks BN-ReLU-conv3x3(stride)-BN-ReLU-Dropout-conv3x3. When a block changes
  channels, the first BN-ReLU runs *before* the split, so its 1x1 strided shortcut conv sees the
  activated input; otherwise the shortcut is the identity on the raw input. MSR init. The paper's
  pre-training network (dropout 0.3 there).
- `wrn-34-10`: the same block semantics with 5 blocks per group, as in Rice et al.
  (locuslab/robust_overfitting), TRADES/ATTA (hzzheng93/ATTA) and YOPO. Those copies also carry an
  unused `sub_block1` (2,102,112 parameters that never run); it is left out here, which changes
  neither the function nor the trained weights, only the parameter count and state_dict keys.
- `wrn-32-10`: Madry et al.'s TF model (MadryLab/cifar10_challenge model.py), also used by Free AT.
  5 units per group, leaky ReLU 0.1, per-image standardisation as the input layer, and
  parameter-free "option A" shortcuts (avg-pool + zero channel padding) taken from the
  *un-activated* input except in unit 1_0. TF BatchNorm epsilon 1e-3 and TF 'SAME' padding.

All heads use adaptive average pooling, identical to avg_pool(8) on 32x32 inputs, so the networks
also run on 28x28 Fashion-MNIST images.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from paper_repro.errors import ConfigError
from paper_repro.models.registry import register_model

__all__ = ["MadryWideResNet", "WideBasic", "WideResNet"]


# ----------------------------------------------------------------------------------------------
# Official WRN / Rice / TRADES wiring
# ----------------------------------------------------------------------------------------------


class WideBasic(nn.Module):
    """Pre-activation B(3,3) block with dropout between the convs (official `wide_basic`).

    The branch point matters: with a projection shortcut the shared BN-ReLU output feeds both the
    residual branch and the 1x1 conv; with an identity shortcut the raw input is added back.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(o)  # activated input, split after the shared BN-ReLU
        else:
            shortcut = x  # identity on the raw input
        o = self.conv1(o)
        o = self.conv2(self.dropout(F.relu(self.bn2(o))))
        return o + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k, depth = 6n+4: stem conv 3x3 -> 16, three groups of n WideBasic blocks of
    widths 16k/32k/64k (strides 1/2/2), head BN-ReLU-GAP-Linear. No conv biases."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WRN depth must be 6n+4, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.group1 = self._group(widths[0], widths[1], n, stride=1, dropout=dropout)
        self.group2 = self._group(widths[1], widths[2], n, stride=2, dropout=dropout)
        self.group3 = self._group(widths[2], widths[3], n, stride=2, dropout=dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBasic(in_planes, out_planes, stride, dropout)]
        blocks += [WideBasic(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # MSR init N(0, sqrt(2 / (k*k*C_out))) for convs (= kaiming_normal fan_out, used by the
        # official Lua code, Rice and ATTA alike); BN 1/0; FC bias 0, FC weight left at default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        o = self.group3(self.group2(self.group1(self.stem(x))))
        return self.pool(F.relu(self.bn(o))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@register_model("wrn-28-10")
def wrn_28_10(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """Official WRN-28-10 (the paper pre-trains it with dropout 0.3): 36,479,194 params at 10 classes."""
    return WideResNet(28, 10, num_classes, in_channels, dropout=dropout)


@register_model("wrn-34-10")
def wrn_34_10(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """Rice/TRADES/ATTA/YOPO WRN-34-10 without the unused `sub_block1`: 46,160,474 params."""
    return WideResNet(34, 10, num_classes, in_channels, dropout=dropout)


# ----------------------------------------------------------------------------------------------
# Madry's TF WRN-32-10
# ----------------------------------------------------------------------------------------------

_TF_BN_EPS = 1e-3  # tf.contrib.layers.batch_norm default
_TF_BN_MOMENTUM = 0.1  # TF decay 0.9
_LEAK = 0.1


class _Conv2dSame(nn.Conv2d):
    """Conv with TF 'SAME' padding. For stride 2 on even inputs TF pads 0 before and 1 after,
    while PyTorch's padding=1 pads both sides: a one-pixel shift of every strided conv."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MadryUnit(nn.Module):
    """Madry's `_residual` unit: pre-activation, leaky ReLU 0.1, parameter-free shortcut.

    `activate_before_residual` (unit 1_0 only) takes the shortcut after the shared BN-ReLU;
    every other unit takes it from the un-activated input. Where channels change, the shortcut is
    avg-pool(kernel=stride) then symmetric zero-padding of channels ("option A"), no 1x1 conv.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.stride = stride
        self.pad_channels = out_planes - in_planes
        if self.pad_channels < 0 or self.pad_channels % 2:
            raise ConfigError(
                f"option-A shortcut needs an even channel increase, got {in_planes}->{out_planes}"
            )
        self.bn1 = nn.BatchNorm2d(in_planes, eps=_TF_BN_EPS, momentum=_TF_BN_MOMENTUM)
        conv = _Conv2dSame if stride > 1 else nn.Conv2d
        self.conv1 = conv(in_planes, out_planes, 3, stride=stride, padding=0 if stride > 1 else 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes, eps=_TF_BN_EPS, momentum=_TF_BN_MOMENTUM)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.leaky_relu(self.bn1(x), _LEAK)
        shortcut = o if self.activate_before_residual else x
        o = self.conv1(o)
        o = self.conv2(F.leaky_relu(self.bn2(o), _LEAK))
        if self.pad_channels:
            if self.stride > 1:
                shortcut = F.avg_pool2d(shortcut, self.stride, self.stride)  # TF 'VALID'
            half = self.pad_channels // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, half))
        return o + shortcut


class MadryWideResNet(nn.Module):
    """WRN-32-10 of MadryLab/cifar10_challenge: stem 3x3 -> 16, 3 stages x 5 units of widths
    160/320/640 (strides 1/2/2), head BN-leakyReLU-GAP-FC(bias). Depth 6*5+2 = 32."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, units: int = 5, widen_factor: int = 10
    ) -> None:
        super().__init__()
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        strides = [1, 2, 2]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for i, stride in enumerate(strides):
            first = MadryUnit(widths[i], widths[i + 1], stride, activate_before_residual=(i == 0))
            rest = [MadryUnit(widths[i + 1], widths[i + 1], 1, False) for _ in range(units - 1)]
            stages.append(nn.Sequential(first, *rest))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(widths[3], eps=_TF_BN_EPS, momentum=_TF_BN_MOMENTUM)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # TF model.py: conv N(0, sqrt(2/(k*k*C_out))); FC uniform_unit_scaling(1.0), i.e.
        # U(-sqrt(3/fan_in), sqrt(3/fan_in)); FC bias 0; BN gamma 1, beta 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = math.sqrt(3.0 / m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        o = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.pool(F.leaky_relu(self.bn(o), _LEAK)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@register_model("wrn-32-10", normalization="per-image")
def wrn_32_10(num_classes: int, in_channels: int = 3) -> MadryWideResNet:
    """Madry/Free-AT WRN-32-10 (TF); per-image standardisation is its input layer. 45,901,914 params."""
    return MadryWideResNet(num_classes, in_channels)
