"""Which images a run sees: its labelled training subset (plus extra pre-training data), its
validation images (held out of training), its test set, the fixed subsets evaluation and
monitoring draw, and the minibatches it trains on. Every choice of images here is a function of
fixed seeds, never of the run's seed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from paper_repro.config import RunConfig
from paper_repro.data.arrays import load_arrays
from paper_repro.data.image_folder import image_folder_size, load_image_subset
from paper_repro.data.loader import ArrayLoader, Augment
from paper_repro.data.registry import DatasetInfo, dataset_info, resolve_data_root
from paper_repro.data.streaming import make_imagenet_loader
from paper_repro.data.ti500k import load_ti500k
from paper_repro.errors import ConfigError

_DATA_SEED = 0  # the labelled subset and the held-out pool are the same for every run
_SUBSET_SEED = 20201224  # fixed: every run, every method evaluates the same images

PseudoLabeller = Callable[[torch.Tensor], torch.Tensor]
"""uint8 images -> the self-training teacher's labels for them."""


def fixed_subset(total: int, n: int | None) -> torch.Tensor:
    """Indices of n images drawn once, independent of the run's seed.

    The first n of one fixed permutation (sorted): a smaller subset is part of a larger one.
    """
    if n is None or n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(_SUBSET_SEED)
    return torch.randperm(total, generator=g)[:n].sort().values


@dataclass(frozen=True)
class TrainSplit:
    """Indices into a dataset's training file, all cut from one fixed permutation (data seed 0):
    `labelled` its first train_subset images (without a subset: all but the validation ones),
    `pool` the next extra_data_n (self-training's pseudo-labelled images), `val` its last val_n.
    The validation images are thus the same for every row, method and seed of a dataset, and
    disjoint from what any run trains on (Rice et al. hold out 1,000 CIFAR-10 images)."""

    labelled: torch.Tensor
    pool: torch.Tensor
    val: torch.Tensor


def train_split(total: int, cfg: RunConfig) -> TrainSplit:
    """The run's training-file indices; a one-line error when the parts do not fit."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(_DATA_SEED))
    n_labelled = total - cfg.val_n if cfg.train_subset is None else cfg.train_subset
    used = n_labelled + cfg.extra_data_n + cfg.val_n
    if n_labelled < 1:
        raise ConfigError(f"val_n = {cfg.val_n} leaves none of the {total} training images of "
                          f"{cfg.dataset} to train on")
    if used > total:
        parts = "train_subset + extra_data_n" + (" + val_n" if cfg.val_n else "")
        raise ConfigError(f"{parts} = {used} exceeds the {total} training images of "
                          f"{cfg.dataset}")
    return TrainSplit(order[:n_labelled], order[n_labelled:n_labelled + cfg.extra_data_n],
                      order[total - cfg.val_n:])


@dataclass
class Data:
    """A run's images. In-memory datasets hold their whole train and test splits here; a
    streamed one (ImageNet) holds only its fixed evaluation subset of val (`test_*`) and its
    monitoring subset of train (`train_*`), and its training batches stream from `stream_root`."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    stream_root: str | None = None
    stream_train_n: int = 0
    val_x: torch.Tensor | None = None  # the validation images (val_n > 0), never trained on
    val_y: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return self.stream_train_n if self.stream_root else len(self.train_y)


def stream_workers() -> int:
    """Decoding processes of a streamed dataset ($REPRO_WORKERS, default up to 8)."""
    return int(os.environ.get("REPRO_WORKERS") or min(8, os.cpu_count() or 1))


def load_data(cfg: RunConfig, pseudo_labeller: PseudoLabeller | None = None) -> Data:
    """Train (the labelled subset, plus extra data for pre-training) and test arrays.
    Self-training's extra images are labelled by `pseudo_labeller` (its teacher's predictions)."""
    info = dataset_info(cfg.dataset)
    if not info.in_memory:
        return load_streamed_data(cfg, info)
    train_x, train_y = load_arrays(cfg.dataset, cfg.data_root, train=True)
    test_x, test_y = load_arrays(cfg.dataset, cfg.data_root, train=False)
    split = train_split(len(train_y), cfg)
    x, y = train_x[split.labelled], train_y[split.labelled]
    if cfg.extra_data == "pseudo-label":
        if pseudo_labeller is None:
            raise ConfigError("extra_data = 'pseudo-label' needs the self-training teacher's "
                              "labels (train through paper_repro.train, which trains it first)")
        extra_x = train_x[split.pool]
        extra_y = pseudo_labeller(extra_x)
        x, y = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    elif cfg.extra_data == "ti500k":
        if not cfg.extra_data_path:
            raise ConfigError("extra_data = 'ti500k' needs extra_data_path (the pickle)")
        extra_x, extra_y = load_ti500k(cfg.extra_data_path)
        x, y = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    val = (train_x[split.val], train_y[split.val]) if cfg.val_n else (None, None)
    return Data(info, x.contiguous(), y.contiguous(), test_x, test_y,
                val_x=val[0], val_y=val[1])


def load_streamed_data(cfg: RunConfig, info: DatasetInfo) -> Data:
    """ImageNet: the training set streams from <data_root>/train through worker processes;
    the evaluation images (a fixed subset of eval_n val images, the same for every row) and the
    monitoring images (monitor_n train images) are decoded once with the evaluation transform."""
    for key, bad in (("train_subset", cfg.train_subset is not None),
                     ("extra_data", cfg.extra_data is not None), ("val_n", cfg.val_n > 0)):
        if bad:
            raise ConfigError(f"{key} is not supported for the streamed dataset "
                              f"'{cfg.dataset}' (it trains on the whole train/ folder)")
    root = resolve_data_root(cfg.data_root)
    n_train = image_folder_size(root, "train")  # a listing of the folder; nothing decoded
    test_x, test_y = load_test_set(cfg)
    train_x, train_y = load_image_subset(root, "train", fixed_subset(n_train, cfg.monitor_n),
                                         workers=stream_workers())
    return Data(info, train_x, train_y, test_x, test_y, stream_root=root, stream_train_n=n_train)


def load_test_set(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the final evaluation sees (re-evaluation reads only these)."""
    info = dataset_info(cfg.dataset)
    if info.in_memory:
        return load_arrays(cfg.dataset, cfg.data_root, train=False)
    root = resolve_data_root(cfg.data_root)
    return load_image_subset(root, "val", fixed_subset(image_folder_size(root, "val"),
                                                       cfg.eval_n), workers=stream_workers())


def train_loader(cfg: RunConfig, data: Data, device: torch.device,
                 shard: tuple[int, int] = (0, 1)) -> Any:
    """Seeded minibatches on the device: batched crop/flip on in-memory arrays (ArrayLoader),
    or ImageNet's RandomResizedCrop + flip decoded by worker processes. A streamed dataset
    decodes only this rank's slice of each batch (`shard` = (rank, world_size)); in-memory
    batches are sliced on the device (distributed.ShardedLoader)."""
    if data.stream_root is not None:
        return make_imagenet_loader(data.stream_root, True, cfg.batch_size,
                                    workers=stream_workers(), shard=shard, seed=cfg.seed,
                                    device=device)
    return ArrayLoader(data.train_x, data.train_y, batch_size=cfg.batch_size, shuffle=True,
                       augment=Augment(pad=cfg.augment_pad, pad_mode=cfg.augment_pad_mode,
                                       pad_value=cfg.augment_pad_value, flip=cfg.augment_flip),
                       drop_last=cfg.drop_last and len(data.train_y) >= cfg.batch_size,
                       device=device, seed=cfg.seed)
