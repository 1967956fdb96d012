"""Fashion-MNIST as IDX files: the user's folder, $REPRO_DATA, then Debian's dataset-fashion-mnist."""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np
import torch

from paper_repro.data.registry import DatasetInfo, one_line, torchvision_download
from paper_repro.errors import DataError

# Where the Debian package dataset-fashion-mnist installs its IDX files (tests monkeypatch this).
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim


def read_fashion_mnist(info: DatasetInfo, root: str, train: bool, download: bool):
    split = "train" if train else "t10k"
    names = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
    searched = _fashion_mnist_dirs(root)
    found = _find_idx_pair(searched, names, info.name)
    if found is None and download:
        torchvision_download(info.name, "FashionMNIST", root, train)
        found = _find_idx_pair([os.path.join(root, "FashionMNIST", "raw")], names, info.name)
    if found is None:
        raise DataError(
            f"{info.name}: no IDX files ({names[0]}[.gz], {names[1]}[.gz]) found in "
            f"{', '.join(searched)}; install the Debian package dataset-fashion-mnist or pass "
            f"--data-root DIR holding them"
        )
    images_path, labels_path = found
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, info.name)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, info.name)
    images_t = torch.from_numpy(images).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return images_t, labels_t, os.path.dirname(images_path)


def _fashion_mnist_dirs(root: str) -> list[str]:
    """Search order: root, root/FashionMNIST/raw, $REPRO_DATA likewise, the Debian package."""
    dirs = [root, os.path.join(root, "FashionMNIST", "raw")]
    env = os.environ.get("REPRO_DATA")
    if env:
        dirs += [env, os.path.join(env, "FashionMNIST", "raw")]
    dirs.append(FASHION_MNIST_DEBIAN_DIR)
    return list(dict.fromkeys(dirs))  # drop duplicates (root may be $REPRO_DATA), keep order


def _find_idx_pair(dirs: list[str], names: tuple[str, str], dataset: str) -> tuple[str, str] | None:
    for folder in dirs:
        paths = [_find_idx_file(folder, n) for n in names]
        if all(paths):
            return paths[0], paths[1]
        if any(paths):
            have, missing = (names[0], names[1]) if paths[0] else (names[1], names[0])
            raise DataError(
                f"{dataset}: {folder} has {have} but not {missing}[.gz]; copy the missing file "
                f"there or remove the partial set"
            )
    return None


def _find_idx_file(folder: str, name: str) -> str | None:
    for candidate in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_idx(path: str, magic: int, dataset: str) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dim, then uint8 payload)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip stream
        raise DataError(
            f"{dataset}: cannot read {path} ({one_line(exc)}); the file is truncated or corrupt, "
            f"re-install or re-download it"
        ) from exc
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(
            f"{dataset}: {path} is not an IDX file with magic number {magic} (found {got}); "
            f"check the file name and re-download it"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = len(raw) - header_len
    if payload != math.prod(dims):
        raise DataError(
            f"{dataset}: {path} is truncated or padded: header says {dims} = {math.prod(dims)} "
            f"bytes of data but the file has {payload}; re-install or re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()
