"""ATTA-k, Adversarial Training with Transferable Adversarial examples (Zheng et al., CVPR 2020),
as in hzzheng93/ATTA (train_atta_cifar.py with data-config/cifar-atta-1-mat.json: the MAT variant).

Algorithm (baselines_spec.md §7): every training image keeps a stored adversarial IMAGE in
padded coordinates, carried across epochs.
    at the first epoch and at each epoch e (1-indexed) with e % reset_every == 0:
        x̃ ← pad(x) + 0.001·N(0, 1)                 (pad 4 px of 0.5 grey; not clamped)
    per minibatch:
        draw a crop offset in {0..2·pad}² and a flip bit per example
        x_nat ← crop+flip(pad(x)),  x_0 ← crop+flip(x̃)        (the SAME crop and flip)
        model.eval();  x_adv ← PGD-k from x_0 around x_nat (step size α, ε-ball, [0,1])
        model.train(); θ ← θ − lr·∇θ CE(f(x_adv), y)
        x̃ ← un-flip x_adv written back into x̃ at the same offsets (the rest of x̃ unchanged)

Reference recipe (ATTA-1, MAT): k=1 step of 0.015 at ε=0.031 (ATTA-3: 0.01, ATTA-10: 0.007),
reset every 10 epochs (fresh at epochs 1, 10, 20, 30), the attack in EVAL mode (BN running
statistics) with the CE loss, the update in train mode, WRN-34-10, SGD lr 0.1, momentum 0.9,
weight decay 2e-4 on all parameters, batch 64 (the last partial batch kept), 38 epochs, LR per
epoch 0.1 for epochs 1-29, 0.01 for 30-35, 0.001 for 36-38: 0-indexed drops at epochs 29 and 35,
i.e. milestones 29/38 and 35/38 with gamma 0.1. The runner's loader must not augment
(augment_pad=0, augment_flip=false): ATTA reads the un-augmented images (`loader.images`) by
`Batch.index` and applies its own augmentation, because the stored images live in padded
coordinates.

Deviations:
- The reference's MAT loss is mean CE divided again by the batch size B (the MNIST script has
  no such factor): with lr 0.1 that makes the CE gradient 64× smaller than weight decay's.
  `loss_scale="mean"` (our default) drops the extra 1/B deliberately; `loss_scale="reference"`
  keeps it (dividing by the minibatch's own size).
- ε is the table's (8/255 at paper scale), not the reference's 0.031; the default step size
  keeps the reference's ratio to ε (0.015/0.031·ε for ATTA-1, likewise for ATTA-3/10).
- The shared `pgd` projects the starting point onto the ε-ball and clamps it to [0,1] before the
  first gradient; the reference takes the first gradient at the stored image as is. They differ
  only at the 0.001-noise pixels of images just reset (stored windows are always in the ball).
- Crop offsets and flips come from torch's global RNG (seeded per epoch by the runner), not
  Python's `random`; the runner's loader reshuffles every epoch, whereas the reference shuffles
  the in-memory set once when loading it.
- `flip=False` (not in the reference) turns the flips off, and `pad=0` the crops, for a stand-in
  whose other rows train without augmentation (the cpu MLP), so ATTA sees the same images.
- Only the stored adversarial images are method state (checkpointed for resume); the natural
  padded images are recomputed from `loader.images` per batch rather than kept on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paper_repro.robustness.attacks import pgd
from paper_repro.config import RunConfig
from paper_repro.errors import ConfigError, ReproError
from paper_repro.training.methods import Context, Meter, Method, register_method

REFERENCE_EPS = 0.031
REFERENCE_STEP_SIZE = {1: 0.015, 3: 0.01, 10: 0.007}  # ATTA-1/3/10 configs, at ε = 0.031
_RESET_NOISE = 0.001


@dataclass(frozen=True)
class ATTASettings:
    steps: int = 1                   # k: attack steps per minibatch (ATTA-k)
    step_size: float | None = None   # in pixels; None: the reference's ATTA-k step, × ε/0.031
    pad: int = 4                     # padding of the stored images, and crop range {0..2·pad}
    pad_value: float = 0.5           # grey border of the padded images
    flip: bool = True                # random horizontal flips (False: a stand-in trained without)
    reset_every: int = 10            # reset the store before 1-indexed epochs e % reset_every == 0
    loss_scale: str = "mean"         # "mean": mean CE; "reference": mean CE / B as the reference

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is None and self.steps not in REFERENCE_STEP_SIZE:
            raise ConfigError(f"step_size: the reference has no step size for steps={self.steps} "
                              "(ATTA-1/3/10 use 0.015/0.01/0.007 at ε=0.031); set step_size")
        if self.step_size is not None and not 0 < self.step_size <= 1:
            raise ConfigError(f"step_size must be in (0, 1], got {self.step_size}")
        if self.pad < 0:
            raise ConfigError(f"pad must be >= 0, got {self.pad}")
        if not 0 <= self.pad_value <= 1:
            raise ConfigError(f"pad_value is in [0,1] pixel units, got {self.pad_value}")
        if self.reset_every < 1:
            raise ConfigError(f"reset_every must be >= 1, got {self.reset_every}")
        if self.loss_scale not in ("mean", "reference"):
            raise ConfigError(f"loss_scale must be 'mean' or 'reference', got '{self.loss_scale}'")

    def alpha(self, eps: float) -> float:
        if self.step_size is not None:
            return self.step_size
        return REFERENCE_STEP_SIZE[self.steps] / REFERENCE_EPS * eps


def pad_images(images: torch.Tensor, pad: int, value: float) -> torch.Tensor:
    """uint8 [B,C,H,W] → float [B,C,H+2p,W+2p] in [0,1] with a constant border (0.5 grey)."""
    return F.pad(images.float().div(255), (pad, pad, pad, pad), mode="constant", value=value)


def fresh_store(images: torch.Tensor, pad: int, value: float) -> torch.Tensor:
    """The reset adversarial images: padded natural images + 0.001·N(0,1), not clamped."""
    natural = pad_images(images, pad, value)
    return natural.add_(torch.randn_like(natural), alpha=_RESET_NOISE)


def _window(offsets: torch.Tensor, channels: int, height: int, width: int) -> tuple:
    """Advanced indices selecting each example's [height × width] window at (top, left)."""
    rows = offsets[:, 0, None] + torch.arange(height, device=offsets.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(width, device=offsets.device)   # [B, W]
    batch = torch.arange(len(offsets), device=offsets.device)[:, None, None, None]
    chans = torch.arange(channels, device=offsets.device)[None, :, None, None]
    return batch, chans, rows[:, None, :, None], cols[:, None, None, :]


def augment(padded: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
            size: tuple[int, int]) -> torch.Tensor:
    """Crop each padded image at (top, left) = offsets[b] to `size`, then flip where flips[b]."""
    crop = padded[_window(offsets, padded.shape[1], *size)]
    return torch.where(flips[:, None, None, None], crop.flip(3), crop)


def inverse_augment(padded: torch.Tensor, crop: torch.Tensor, offsets: torch.Tensor,
                    flips: torch.Tensor) -> torch.Tensor:
    """A copy of `padded` with un-flipped `crop` written into its window; the rest unchanged."""
    out = padded.clone()
    out[_window(offsets, crop.shape[1], *crop.shape[2:])] = \
        torch.where(flips[:, None, None, None], crop.flip(3), crop)
    return out


@register_method
class ATTA(Method):
    name = "atta"
    marker = "P"  # its symbol in the Pareto figures
    Settings = ATTASettings
    needs_arrays = True  # one stored perturbation per training image, indexed by Batch.index
    recipe = dict(
        arch="wrn-34-10", epochs=38, batch_size=64, drop_last=False, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=False, weight_decay=2e-4, wd_scope="all", schedule="multistep",
        schedule_args={"milestones": [29 / 38, 35 / 38], "gamma": 0.1},
        augment_pad=0, augment_flip=False,
    )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if cfg.augment_pad != 0 or cfg.augment_flip:
            raise ConfigError("atta applies its own crop and flip (method_args.pad); the loader "
                              f"must not augment: set augment_pad=0 and augment_flip=false (got "
                              f"augment_pad={cfg.augment_pad}, augment_flip={cfg.augment_flip})")
        self.adv: torch.Tensor | None = None  # stored adversarial images [N, C, H+2p, W+2p]

    def train_epoch(self, ctx: Context) -> dict[str, float]:
        s = self.settings
        model, meter, device = ctx.model, Meter(ctx.device), ctx.device
        images = ctx.loader.images  # the un-augmented uint8 training set, indexed by Batch.index
        size = tuple(images.shape[2:])
        if self.adv is None or (ctx.epoch + 1) % s.reset_every == 0:  # ctx.epoch is 0-indexed
            self.adv = fresh_store(images, s.pad, s.pad_value)
        elif self.adv.shape[0] != images.shape[0]:
            raise ReproError(f"atta: {self.adv.shape[0]} stored adversarial images for a "
                             f"training set of {images.shape[0]}")
        alpha = s.alpha(ctx.eps)
        for batch in ctx.loader:
            index, y, b = batch.index, batch.y, len(batch.index)
            # drawn on the device: a host-to-device copy per batch would be a host sync
            offsets = torch.randint(0, 2 * s.pad + 1, (b, 2), device=device)
            flips = (torch.rand(b, device=device) < 0.5 if s.flip
                     else torch.zeros(b, dtype=torch.bool, device=device))
            stored = self.adv[index]
            x_nat = augment(pad_images(images[index], s.pad, s.pad_value), offsets, flips, size)
            x_start = augment(stored, offsets, flips, size)  # continue from the stored image
            model.eval()  # the reference attacks with BN running statistics
            x_adv = pgd(model, x_nat, y, eps=ctx.eps, alpha=alpha, steps=s.steps,
                        delta=x_start - x_nat)
            model.train()
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y)
            (loss / b if s.loss_scale == "reference" else loss).backward()
            ctx.step()
            meter.update(logits, y, loss)
            # data parallel: every rank stores the whole global batch (ctx.gather), so the
            # next epoch finds each image's state whichever rank gets it
            self.adv[ctx.gather(index)] = ctx.gather(inverse_augment(stored, x_adv, offsets, flips))
            if ctx.done:
                break
        return meter.result()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.adv is None else {"adv": self.adv}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adv = state.get("adv")
