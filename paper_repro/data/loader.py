"""Minibatches of in-memory datasets, augmented on the device in one batched op per batch.

Augmentation per method (baselines_spec.md §11.12), expressed as `Augment`:
    Fast AT, YOPO      Augment(pad=4, pad_mode="zeros", flip=True)
    Rice PGD-AT, WRN   Augment(pad=4, pad_mode="reflect", flip=True)
    ATTA               Augment() in the loader; baselines/atta.py crops and flips itself (pad 4, 0.5 grey, flip)
    Madry / Free (TF)  Augment(pad=2, pad_mode="zeros", flip=True)
    test sets          Augment()  (none)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from paper_repro.errors import ConfigError, DataError

_PAD_MODES = ("zeros", "reflect", "constant")


@dataclass(frozen=True)
class Augment:
    pad: int = 0  # pixels of padding per side before a random crop back to the original size; 0 = no crop
    pad_mode: str = "zeros"  # "zeros", "reflect", or "constant" with pad_value
    pad_value: float = 0.0  # in [0,1] pixel units, used by "constant" (ATTA pads with 0.5 grey)
    flip: bool = False  # random horizontal flip

    def __post_init__(self):
        if self.pad < 0:
            raise ConfigError(f"augment pad must be >= 0 pixels, got {self.pad}")
        if self.pad_mode not in _PAD_MODES:
            raise ConfigError(
                f"unknown augment pad_mode {self.pad_mode!r}; valid modes: {', '.join(_PAD_MODES)}"
            )
        if not 0.0 <= self.pad_value <= 1.0:
            raise ConfigError(f"augment pad_value is in [0,1] pixel units, got {self.pad_value}")

    @property
    def is_identity(self) -> bool:
        return self.pad == 0 and not self.flip


class Batch(NamedTuple):
    x: torch.Tensor  # float32 images in [0,1], [B,C,H,W], on the loader's device
    y: torch.Tensor  # int64 labels
    index: torch.Tensor  # int64 indices into the loader's arrays (ATTA keeps per-sample state by index)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch), so nearby pairs give unrelated streams."""
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class EpochSeeded:
    """A loader whose epoch e is a pure function of (seed, e): `set_epoch(e)` picks the epoch of
    the next iteration and each iteration advances it, so a resumed run replays epoch e."""

    seed: int
    _epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        epoch_seed(self.seed, epoch)  # validate
        self._epoch = epoch

    def _take_epoch(self) -> int:
        epoch, self._epoch = self._epoch, self._epoch + 1
        return epoch


class ArrayLoader(EpochSeeded):
    """Minibatches from in-memory uint8 arrays, augmented on the device in one batched op (airbench's CifarLoader idea).

    The arrays move to `device` once, as uint8. Each epoch draws, on a private CPU generator seeded
    from (seed, epoch), one permutation and one crop offset and flip bit per example; those small
    index tensors move to the device once per epoch. The batches of epoch e are therefore a pure
    function of (seed, e) and do not depend on the device. `set_epoch(e)` picks the epoch for the
    next iteration; each iteration then advances it by one, so a loop that never calls set_epoch
    still sees fresh augmentation every epoch, and a run resumed with set_epoch(e) replays epoch e.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        augment: Augment = Augment(),
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(
                f"ArrayLoader needs uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"ArrayLoader got {images.shape[0]} images but labels of shape {tuple(labels.shape)}"
            )
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        height, width = images.shape[2:]
        if augment.pad_mode == "reflect" and augment.pad >= min(height, width):
            raise ConfigError(
                f"reflect padding of {augment.pad} needs images larger than that, got {height}x{width}"
            )
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()  # once, as uint8
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self._epoch = 0
        epoch_seed(seed, 0)  # validate the seed now rather than at the first iteration

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self._batches(self._take_epoch())

    def _batches(self, epoch: int) -> Iterator[Batch]:
        n, pad = self.num_samples, self.augment.pad
        gen = torch.Generator(device="cpu")
        gen.manual_seed(epoch_seed(self.seed, epoch))
        # All randomness of the epoch is drawn up front on the CPU, in a fixed order.
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        offsets = flips = None
        if pad > 0:
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).to(self.device)
        if self.augment.flip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[index].float().div_(255)
            if pad > 0:
                rows = slice(i * self.batch_size, i * self.batch_size + len(index))
                x = _random_crop(x, pad, self.augment, offsets[rows])
            if self.augment.flip:
                flip = flips[i * self.batch_size:i * self.batch_size + len(index)]
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            yield Batch(x, self.labels[index], index)


def _random_crop(x: torch.Tensor, pad: int, augment: Augment, offsets: torch.Tensor) -> torch.Tensor:
    """Pad the batch once, then gather each example's window at (top, left) = offsets[b] in one op."""
    b, c, h, w = x.shape
    if augment.pad_mode == "reflect":
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    else:
        value = augment.pad_value if augment.pad_mode == "constant" else 0.0
        padded = F.pad(x, (pad, pad, pad, pad), mode="constant", value=value)
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # [B, W]
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
