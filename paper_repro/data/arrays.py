"""Whole splits of the in-memory datasets, read once into uint8 tensors by their format's reader
and checked against the registry, whatever the format."""

from __future__ import annotations

from typing import Callable

import torch

from paper_repro.data.cifar import read_cifar
from paper_repro.data.idx import read_fashion_mnist
from paper_repro.data.registry import check_arrays, dataset_info, resolve_data_root
from paper_repro.errors import ConfigError

_READERS: dict[str, Callable] = {
    "cifar10": read_cifar,
    "cifar100": read_cifar,
    "fashion-mnist": read_fashion_mnist,
}


def load_arrays(
    name: str, root: str | None, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a whole split into memory.

    Returns images uint8 [N, C, H, W] (contiguous) and labels int64 [N]. `root` None means
    $REPRO_DATA if set, else ./data. Raises DataError if the files are missing or malformed.
    """
    info = dataset_info(name)
    if not info.in_memory:
        raise ConfigError(
            f"{name} is not an in-memory dataset; use make_imagenet_loader(root, train, batch_size)"
        )
    images, labels, where = _READERS[name](info, resolve_data_root(root), train, download)
    check_arrays(info, images, labels, where)
    return images.contiguous(), labels
