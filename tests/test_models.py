"""Pins paper_repro.models: parameter counts, the wirings that tell the reference networks apart,
normalisation inside the model, and the registry's error messages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from paper_repro.errors import ConfigError
from paper_repro.models import ImageClassifier, create_model, list_models, register_model
from paper_repro.models.registry import Normalize, PerImageStandardize
from paper_repro.models.wide_resnet import MadryWideResNet, WideBasic, WideResNet
from paper_repro.training.methods import list_methods


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# wrn-32-10 (Madry TF) was computed by hand, then checked against the built model:
#   stem conv 3*3*3*16                                               =        432
#   stage 1: unit 1_0 BN(16) 32 + conv 9*16*160 23,040 + BN(160) 320 + conv 9*160*160 230,400
#                                                                    =    253,792
#            units 1_1..1_4: 4 * (320 + 230,400 + 320 + 230,400)     =  1,845,760
#   stage 2: unit 2_0 BN(160) 320 + conv 9*160*320 460,800 + BN(320) 640 + conv 9*320*320 921,600
#                                                                    =  1,383,360
#            units 2_1..2_4: 4 * (640 + 921,600 + 640 + 921,600)     =  7,377,920
#   stage 3: unit 3_0 BN(320) 640 + conv 9*320*640 1,843,200 + BN(640) 1,280 + conv 9*640*640
#            3,686,400                                               =  5,531,520
#            units 3_1..3_4: 4 * (1,280 + 3,686,400 + 1,280 + 3,686,400) = 29,501,440
#   head BN(640) 1,280 + FC 640*10 + 10 = 6,410                      =      7,690
#   total (option-A shortcuts have no parameters)                    = 45,901,914  (spec: ≈45.9M)
PINNED_PARAMS = {
    "wrn-28-10": 36_479_194,
    "wrn-34-10": 46_160_474,
    "wrn-32-10": 45_901_914,
    "preact-resnet18": 11_172_170,
    "preact-resnet18-yopo": 11_171_146,
}


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_parameter_count_matches_reference(name: str) -> None:
    assert _n_params(create_model(name, num_classes=10)) == PINNED_PARAMS[name]


def test_resnet50_is_torchvision_resnet50() -> None:
    ours = create_model("resnet50", num_classes=10).net
    ref = torchvision.models.resnet50(weights=None, num_classes=10)
    assert _n_params(ours) == _n_params(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())  # torchvision checkpoints load
    assert ours.stem is ours.conv1 and ours.classifier is ours.fc


# Models that flatten their input are built for the image size (convolutional ones take any).
FLAT_MODELS = {"mlp"}


@pytest.mark.parametrize("shape", [(3, 32), (1, 28)], ids=["32x32x3", "28x28x1"])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_interface(name: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    channels, size = shape
    sized = {"image_size": size} if name in FLAT_MODELS else {}
    model = create_model(name, num_classes=7, in_channels=channels, **sized)
    assert isinstance(model, ImageClassifier)
    assert model.stem is model.net.stem
    if name in FLAT_MODELS:  # YOPO's layer one: a Linear on the flattened image
        assert isinstance(model.stem, nn.Linear)
        assert model.stem.in_features == channels * size * size
    else:
        assert isinstance(model.stem, nn.Conv2d) and model.stem.in_channels == channels
    assert isinstance(model.net.classifier, nn.Linear)
    x = torch.rand(2, channels, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    feats = model.features(x)
    assert feats.ndim == 2 and feats.shape[0] == 2
    assert feats.shape[1] == model.net.classifier.in_features
    torch.testing.assert_close(model.net.classifier(feats), out)
    out.square().sum().backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0


def test_mean_std_normalisation_is_the_first_layer() -> None:
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    model = create_model("cnn-small", num_classes=10, in_channels=3, mean=mean, std=std).eval()
    assert isinstance(model.normalize, Normalize)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
    assert isinstance(create_model("cnn-small", num_classes=10).normalize, nn.Identity)


def test_mean_std_must_match_channels() -> None:
    with pytest.raises(ConfigError):
        create_model("cnn-small", num_classes=10, in_channels=1, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ConfigError):
        create_model("cnn-small", num_classes=10, mean=(0.5, 0.5, 0.5))


def test_wrn32_uses_per_image_standardisation_whatever_mean_std() -> None:
    model = create_model("wrn-32-10", num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert isinstance(model.normalize, PerImageStandardize)


def test_per_image_standardisation_matches_tf_formula() -> None:
    x = torch.rand(3, 3, 32, 32)
    x[2] = 0.5  # constant image: std 0 hits the floor instead of dividing by zero
    out = PerImageStandardize(input_scale=255.0)(x)
    x255 = x * 255
    n = x[0].numel()
    for i in range(3):
        mean, std = x255[i].mean(), x255[i].std(unbiased=False)
        expected = (x255[i] - mean) / torch.clamp(std, min=1 / n**0.5)
        torch.testing.assert_close(out[i], expected)
    torch.testing.assert_close(out[:2].flatten(1).std(dim=1, unbiased=False), torch.ones(2))
    assert torch.all(out[2] == 0)


def test_wrn_block_equations() -> None:
    """Official wide_basic: a projection block splits after the shared BN-ReLU; an identity block
    adds the raw input."""
    torch.manual_seed(0)
    net = WideResNet(depth=10, widen_factor=2, num_classes=10).eval()
    x = torch.randn(2, 16, 8, 8)
    proj = net.group2[0]  # 32 -> 64 channels, stride 2
    x2 = torch.randn(2, 32, 8, 8)
    same = net.group1[0]  # 16 -> 32 channels: also a projection
    ident = WideBasic(32, 32, 1, 0.0).eval()
    with torch.no_grad():
        for block, inp in ((proj, x2), (same, x)):
            a = F.relu(block.bn1(inp))
            branch = block.conv2(F.relu(block.bn2(block.conv1(a))))
            torch.testing.assert_close(block(inp), branch + block.shortcut(a))
        assert ident.shortcut is None
        a = F.relu(ident.bn1(x2))
        torch.testing.assert_close(ident(x2), ident.conv2(F.relu(ident.bn2(ident.conv1(a)))) + x2)


def test_madry_unit_equations() -> None:
    """Unit 1_0 takes the shortcut after BN-leakyReLU, the others from the raw input; option A
    = avg-pool(stride) then symmetric zero channel padding."""
    torch.manual_seed(0)
    net = MadryWideResNet(num_classes=10, units=2, widen_factor=2).eval()  # widths 16/32/64/128
    first, down = net.stage1[0], net.stage2[0]
    x, x2 = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        a = F.leaky_relu(first.bn1(x), 0.1)
        branch = first.conv2(F.leaky_relu(first.bn2(first.conv1(a)), 0.1))
        torch.testing.assert_close(first(x), branch + F.pad(a, (0, 0, 0, 0, 8, 8)))
        a = F.leaky_relu(down.bn1(x2), 0.1)
        branch = down.conv2(F.leaky_relu(down.bn2(down.conv1(a)), 0.1))
        shortcut = F.pad(F.avg_pool2d(x2, 2), (0, 0, 0, 0, 16, 16))
        torch.testing.assert_close(down(x2), branch + shortcut)


def test_madry_wrn_wiring() -> None:
    net = create_model("wrn-32-10", num_classes=10).net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) for c in convs)  # option-A shortcuts, no 1x1 convs
    units = [*net.stage1, *net.stage2, *net.stage3]
    assert len(units) == 15
    assert [u.activate_before_residual for u in units] == [True] + [False] * 14
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.eps == 1e-3 and bn.momentum == 0.1 for bn in bns)  # TF defaults, decay 0.9


def test_madry_strided_conv_uses_tf_same_padding() -> None:
    conv = create_model("wrn-32-10", num_classes=10).net.stage2[0].conv1
    x = torch.randn(1, 160, 8, 8)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)  # TF pads 0 before, 1 after
        torch.testing.assert_close(conv(x), expected)


def _shortcut_input_and_block_input(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    block = model.net.layer2[0]  # first downsampling block
    assert isinstance(block.shortcut, nn.Conv2d)
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda mod, args: seen.__setitem__("block", args[0].detach()))
    block.shortcut.register_forward_hook(
        lambda mod, args, out: seen.__setitem__("shortcut", args[0].detach())
    )
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    return block, seen["block"], seen["shortcut"]


def test_fast_at_shortcut_conv_sees_raw_block_input() -> None:
    block, x, shortcut_in = _shortcut_input_and_block_input("preact-resnet18")
    torch.testing.assert_close(shortcut_in, x)
    with torch.no_grad():
        assert not torch.allclose(shortcut_in, F.relu(block.bn1(x)))


def test_yopo_shortcut_conv_sees_activated_input() -> None:
    block, x, shortcut_in = _shortcut_input_and_block_input("preact-resnet18-yopo")
    with torch.no_grad():
        torch.testing.assert_close(shortcut_in, F.relu(block.bn1(x)))
    assert not torch.allclose(shortcut_in, x)
    assert create_model("preact-resnet18-yopo", num_classes=10).net.bn is None  # no final BN-ReLU


def test_wrn28_dropout_between_convs() -> None:
    default = create_model("wrn-28-10", num_classes=10)
    assert not any(isinstance(m, nn.Dropout) for m in default.modules())
    torch.manual_seed(0)
    model = create_model("wrn-28-10", num_classes=10, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 12 and all(d.p == 0.3 for d in drops)  # one per block, 3 groups x 4
    assert all(isinstance(b.dropout, nn.Dropout) for g in (model.net.group1, model.net.group2) for b in g)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        eval_out = model(x)
        model.train()
        assert not torch.allclose(model(x), model(x))  # BN is deterministic: only dropout differs
        assert not torch.allclose(model(x), eval_out)


def test_none_kwargs_fall_back_to_model_default() -> None:
    model = create_model("wrn-28-10", num_classes=10, dropout=None)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("wrn-28-11", num_classes=10)
    message = str(info.value)
    assert "wrn-28-10" in message and "preact-resnet18" in message
    assert "\n" not in message


def test_unknown_kwarg_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("preact-resnet18", num_classes=10, dropout=0.3)
    assert "dropout" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        create_model("cnn-small", num_classes=10, widht=8)


def test_small_cnn_width_scales_channels() -> None:
    net = create_model("cnn-small", num_classes=10, in_channels=1, width=8).net
    assert net.stem.out_channels == 8
    assert net.classifier.in_features == 128


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError):
        register_model("cnn-small")(lambda num_classes, in_channels: nn.Identity())


def test_mlp_is_784_width_width_10_on_fashion_mnist() -> None:
    """The regime search's MLP 784-1024-1024-10: 1,863,690 parameters
    (784·1024 + 1024 + 1024·1024 + 1024 + 1024·10 + 10)."""
    model = create_model("mlp", num_classes=10, in_channels=1)
    assert _n_params(model) == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    small = create_model("mlp", num_classes=10, in_channels=1, width=512, depth=3).net
    assert [m.out_features for m in small.modules() if isinstance(m, nn.Linear)] == \
        [512, 512, 512, 10]


def test_mlp_on_the_wrong_image_size_is_a_one_line_error() -> None:
    model = create_model("mlp", num_classes=10, in_channels=1)  # built for 28x28
    with pytest.raises(ConfigError, match="model_args.image_size") as info:
        model(torch.rand(2, 1, 32, 32))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="width and depth"):
        create_model("mlp", num_classes=10, depth=0)


@pytest.mark.parametrize("method", list_methods())
def test_mlp_trains_under_every_method(method: str) -> None:
    """Two optimiser steps (Fast AT's cyclic LR is 0 at the first) of each registered method's
    recipe on a narrow MLP (synthetic Fashion-MNIST-shaped batches): finite loss, and the stem
    and the head both move (YOPO updates the stem with its own optimiser, from the layer-one
    Hamiltonian)."""
    import dataclasses

    from paper_repro.perf import harness

    cfg = harness.bench_config(method, "mlp", 8, dataset="fashion-mnist", device="cpu",
                             precision="fp32", model_args={"width": 16})
    b = harness.make_bench(dataclasses.replace(cfg, eps=0.1), steps=2)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    stats = b.run(b.method.train_epoch, max_steps=2)
    assert math.isfinite(stats["train_loss"])
    after = b.model.state_dict()
    for key in ("net.stem.weight", "net.classifier.weight"):
        assert not torch.equal(before[key], after[key]), key
    if method == "yopo":
        stem = {id(p) for p in b.model.stem.parameters()}
        assert {id(p) for g in b.optimizers[0].param_groups for p in g["params"]} == stem
