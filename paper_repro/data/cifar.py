"""CIFAR-10 and CIFAR-100 as torchvision publishes them: python pickle batches."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from paper_repro.data.registry import DatasetInfo, one_line, torchvision_download
from paper_repro.errors import DataError

@dataclass(frozen=True)
class _CifarFormat:
    folder: str  # torchvision's extracted folder name
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    torchvision_class: str


_CIFAR_FORMATS = {
    "cifar10": _CifarFormat("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                            ("test_batch",), b"labels", "CIFAR10"),
    "cifar100": _CifarFormat("cifar-100-python", ("train",), ("test",), b"fine_labels", "CIFAR100"),
}


def read_cifar(info: DatasetInfo, root: str, train: bool, download: bool):
    fmt = _CIFAR_FORMATS[info.name]
    files = fmt.train_files if train else fmt.test_files
    folder = _find_cifar_folder(fmt, root)
    if folder is None and download:
        torchvision_download(info.name, fmt.torchvision_class, root, train)
        folder = _find_cifar_folder(fmt, root)
    if folder is None:
        raise DataError(
            f"{info.name}: no torchvision-format batches ({', '.join(files)}) in "
            f"{os.path.join(root, fmt.folder)} or {root}; torchvision's python pickle format is "
            f"expected: run torchvision.datasets.{fmt.torchvision_class}(ROOT, download=True) on a "
            f"machine with internet, copy ROOT here and pass --data-root ROOT"
        )
    images, labels = [], []
    for file in files:
        x, y = _read_cifar_batch(os.path.join(folder, file), fmt.label_key, info.name)
        images.append(x)
        labels.append(y)
    images_t = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32)
    labels_t = torch.from_numpy(np.concatenate(labels))
    return images_t, labels_t, folder


def _find_cifar_folder(fmt: _CifarFormat, root: str) -> str | None:
    """<root>/<folder> or root itself, whichever holds the batch files; None if neither."""
    for folder in (os.path.join(root, fmt.folder), root):
        if any(os.path.isfile(os.path.join(folder, f)) for f in fmt.train_files + fmt.test_files):
            return folder
    return None


def _read_cifar_batch(path: str, label_key: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(
            f"{name}: missing batch file {path}; the extracted folder is incomplete, re-download "
            f"it with torchvision.datasets (download=True)"
        )
    # CIFAR pickles are trusted-format data files (the user's own torchvision download), read the
    # way the dataset's authors publish them: pickle with encoding='bytes' for the Python 2 origin.
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling garbage can raise almost any exception type
        raise DataError(
            f"{name}: {path} is not a CIFAR python pickle ({type(exc).__name__}: {one_line(exc)}); "
            f"re-download it with torchvision.datasets (download=True)"
        ) from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        found = sorted(map(repr, batch)) if isinstance(batch, dict) else [type(batch).__name__]
        raise DataError(
            f"{name}: {path} is not a CIFAR batch: expected a dict with keys b'data' and "
            f"{label_key!r}, found {', '.join(found)}; re-download it with torchvision.datasets"
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(
            f"{name}: b'data' in {path} is {shape} {getattr(data, 'dtype', '')}, expected uint8 "
            f"N x 3072 (CHW rows); re-download it with torchvision.datasets"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{name}: {label_key!r} in {path} is not a list of integers ({one_line(exc)}); "
            f"re-download it with torchvision.datasets"
        ) from exc
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{name}: {path} has {data.shape[0]} images but {labels.shape[0]} labels; "
            f"re-download it with torchvision.datasets"
        )
    return data, labels
