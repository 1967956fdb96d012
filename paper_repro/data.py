"""Datasets: a small registry, readers for the on-disk formats, and loaders of [0,1] images.

Every loader yields `Batch(x, y, index)` with x float32 in [0,1]; mean/std normalisation is the
model's first layer (DESIGN §4). The in-memory datasets (cifar10, cifar100, fashion-mnist) are read
once into uint8 tensors by `load_arrays` and served by `ArrayLoader`, which keeps them on the device
and does random crop + flip for the whole batch in one vectorised op (airbench's `CifarLoader` idea).
ImageNet goes through torchvision's ImageFolder in `make_imagenet_loader`.

Augmentation per method (baselines_spec.md §11.12), expressed as `Augment`:
    Fast AT, YOPO      Augment(pad=4, pad_mode="zeros", flip=True)
    Rice PGD-AT, WRN   Augment(pad=4, pad_mode="reflect", flip=True)
    ATTA               Augment() in the loader; baselines/atta.py crops and flips itself (pad 4, 0.5 grey, flip)
    Madry / Free (TF)  Augment(pad=2, pad_mode="zeros", flip=True)
    test sets          Augment()  (none)

Where things are found: `root` (the CLI's --data-root), else $REPRO_DATA, else ./data.
Fashion-MNIST also falls back to the Debian package dataset-fashion-mnist. Nothing is downloaded
unless `download=True`. Every user-facing problem raises DataError or ConfigError with one line.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from paper_repro.errors import ConfigError, DataError

# Where the Debian package dataset-fashion-mnist installs its IDX files (tests monkeypatch this).
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_DATA_ROOT = "data"  # used when neither root nor $REPRO_DATA is given


# ------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int  # H == W
    mean: tuple[float, ...]  # per channel, in [0,1] units; used by the model's normalisation layer
    std: tuple[float, ...]
    class_names: tuple[str, ...]  # empty for imagenet: its 1000 classes are the folder names (wnids)
    in_memory: bool  # True: whole set fits as one uint8 tensor (load_arrays + ArrayLoader)


_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# CIFAR-100 fine labels in index order (alphabetical, as in the dataset's meta file).
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        # CIFAR-10 mean/std as in Rice / Fast AT (baselines_spec.md, [RO] utils.py L17-18).
        DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                    _CIFAR10_CLASSES, in_memory=True),
        DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    _CIFAR100_CLASSES, in_memory=True),
        DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
                    _FASHION_MNIST_CLASSES, in_memory=True),
        DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    (), in_memory=False),
    )
}


def list_datasets() -> list[str]:
    """Names accepted by `dataset_info` and `load_arrays`."""
    return list(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for `name`; an unknown name raises ConfigError listing the valid ones."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}"
        ) from None


# ------------------------------------------------------------------------------------------------
# Readers for in-memory datasets


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
    root = _resolve_root(root)
    images, labels, where = _READERS[name](info, root, train, download)
    _check_arrays(info, images, labels, where)
    return images.contiguous(), labels


def _resolve_root(root: str | None) -> str:
    if root is not None:
        return root
    return os.environ.get("REPRO_DATA") or DEFAULT_DATA_ROOT


def _one_line(text: object) -> str:
    """Collapse an embedded exception message to one line (our errors are single-line)."""
    return " ".join(str(text).split())


def _check_arrays(info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    expected = (info.channels, info.size, info.size)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DataError(
            f"{info.name}: images in {where} have shape {tuple(images.shape)} and dtype "
            f"{images.dtype}, expected uint8 [N, {', '.join(map(str, expected))}]; "
            f"the files are not in the expected format, re-download them"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{info.name}: {images.shape[0]} images but {labels.shape[0]} labels in {where}; "
            f"the files are truncated or mismatched, re-download them"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(
            f"{info.name}: labels in {where} span [{int(labels.min())}, {int(labels.max())}], "
            f"expected [0, {info.num_classes}); the files are corrupt or from another dataset"
        )


# CIFAR: torchvision's python pickle batches ------------------------------------------------------


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


def _read_cifar(info: DatasetInfo, root: str, train: bool, download: bool):
    fmt = _CIFAR_FORMATS[info.name]
    files = fmt.train_files if train else fmt.test_files
    folder = _find_cifar_folder(fmt, root)
    if folder is None and download:
        _torchvision_download(info.name, fmt.torchvision_class, root, train)
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
            f"{name}: {path} is not a CIFAR python pickle ({type(exc).__name__}: {_one_line(exc)}); "
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
            f"{name}: {label_key!r} in {path} is not a list of integers ({_one_line(exc)}); "
            f"re-download it with torchvision.datasets"
        ) from exc
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{name}: {path} has {data.shape[0]} images but {labels.shape[0]} labels; "
            f"re-download it with torchvision.datasets"
        )
    return data, labels


def _torchvision_download(name: str, cls_name: str, root: str, train: bool) -> None:
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, cls_name)(root, train=train, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise DataError(
            f"{name}: torchvision download into {root} failed ({_one_line(exc)}); download it on "
            f"a machine with internet and pass --data-root DIR"
        ) from exc


# Fashion-MNIST: IDX files ---------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim


def _read_fashion_mnist(info: DatasetInfo, root: str, train: bool, download: bool):
    split = "train" if train else "t10k"
    names = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
    searched = _fashion_mnist_dirs(root)
    found = _find_idx_pair(searched, names, info.name)
    if found is None and download:
        _torchvision_download(info.name, "FashionMNIST", root, train)
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
            f"{dataset}: cannot read {path} ({_one_line(exc)}); the file is truncated or corrupt, "
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


_READERS: dict[str, Callable] = {
    "cifar10": _read_cifar,
    "cifar100": _read_cifar,
    "fashion-mnist": _read_fashion_mnist,
}


# ti500k: Carmon et al.'s pseudo-labelled Tiny Images ----------------------------------------


def load_ti500k(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ti_500K_pseudo_labeled.pickle: images uint8 [N, 3, 32, 32] and int64 labels [N].

    The file is a dict with 'data' uint8 (N, 32, 32, 3) HWC and 'extrapolated_targets' (N ints in
    0-9) (ecosystem.md §D.4). CHW (N, 3, 32, 32) is accepted too, as the published scripts emit it.
    """
    hint = "download ti_500K_pseudo_labeled.pickle as linked from Carmon et al.'s semisup-adv README"
    if not os.path.isfile(path):
        raise DataError(f"ti500k: no file at {path}; {hint} and pass its path")
    # Trusted-format data file: the user's own download of the authors' pickle.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling garbage can raise almost any exception type
        raise DataError(
            f"ti500k: {path} is not a readable pickle ({type(exc).__name__}: {_one_line(exc)}); {hint}"
        ) from exc
    data = _get_key(obj, "data")
    targets = _get_key(obj, "extrapolated_targets")
    if data is None or targets is None:
        found = sorted(map(repr, obj)) if isinstance(obj, dict) else [type(obj).__name__]
        raise DataError(
            f"ti500k: {path} is not the pseudo-labelled pickle: expected a dict with keys 'data' and "
            f"'extrapolated_targets', found {', '.join(found)}; {hint}"
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] not in ((32, 32, 3), (3, 32, 32)):
        raise DataError(
            f"ti500k: 'data' in {path} is {data.dtype} {data.shape}, expected uint8 (N, 32, 32, 3) "
            f"or (N, 3, 32, 32); {hint}"
        )
    images = torch.from_numpy(data)
    if data.shape[1:] == (32, 32, 3):
        images = images.permute(0, 3, 1, 2)  # HWC -> CHW
    try:
        labels = torch.from_numpy(np.asarray(targets, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"ti500k: 'extrapolated_targets' in {path} is not a list of integers ({_one_line(exc)})"
        ) from exc
    info = DatasetInfo("ti500k", 10, 3, 32, (), (), _CIFAR10_CLASSES, in_memory=True)
    _check_arrays(info, images, labels, path)
    return images.contiguous(), labels


def _get_key(obj: object, key: str):
    """dict lookup accepting str or bytes keys (a Python 2 pickle read with encoding='bytes')."""
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return obj[key]
    return obj.get(key.encode())


# ------------------------------------------------------------------------------------------------
# In-memory loader with on-device batched augmentation

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


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch), so nearby pairs give unrelated streams."""
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class ArrayLoader:
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
        _epoch_seed(seed, 0)  # validate the seed now rather than at the first iteration

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        _epoch_seed(self.seed, epoch)  # validate
        self._epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        n, pad = self.num_samples, self.augment.pad
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_epoch_seed(self.seed, epoch))
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


# ------------------------------------------------------------------------------------------------
# ImageNet


class _IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so each item also carries its index (module level, so workers can pickle it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


class _ImageNetLoader:
    """A DataLoader that yields Batch and is seeded per epoch like ArrayLoader.

    Batches stay on the CPU (pinned when CUDA is available) unless `device` is given, then they
    move there (non-blocking from pinned memory) as they are drawn.
    The shuffle order and the workers' base seed come from a generator reseeded from (seed, epoch);
    with workers=0 the transforms draw from torch's global RNG instead.
    """

    def __init__(self, dataset, train: bool, batch_size: int, workers: int, distributed: bool,
                 seed: int, device: torch.device | None = None):
        self.seed, self.batch_size, self.device = seed, batch_size, device
        self._epoch = 0
        self._generator = torch.Generator()
        self._generator.manual_seed(_epoch_seed(seed, 0))
        self.dataset = _IndexedDataset(dataset)
        if distributed:
            # Val with shuffle=False: DistributedSampler pads with repeats to split evenly.
            self.sampler = torch.utils.data.DistributedSampler(self.dataset, shuffle=train, seed=seed)
        elif train:
            self.sampler = torch.utils.data.RandomSampler(self.dataset, generator=self._generator)
        else:
            self.sampler = torch.utils.data.SequentialSampler(self.dataset)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            generator=self._generator,
        )

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        _epoch_seed(self.seed, epoch)  # validate
        self._epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._epoch += 1
        self._generator.manual_seed(_epoch_seed(self.seed, epoch))
        if isinstance(self.sampler, torch.utils.data.DistributedSampler):
            self.sampler.set_epoch(epoch)
        if self.device is None:
            return (Batch(x, y, index) for x, y, index in self.loader)
        return (Batch(*(t.to(self.device, non_blocking=True) for t in (x, y, index)))
                for x, y, index in self.loader)


def make_imagenet_loader(
    root: str,
    train: bool,
    batch_size: int,
    *,
    workers: int = 8,
    distributed: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
) -> Iterable[Batch]:
    """ImageFolder on <root>/train or <root>/val, yielding Batch of [0,1] images.

    train: RandomResizedCrop(224) + RandomHorizontalFlip; val: Resize(256) + CenterCrop(224).
    No Normalize: normalisation lives in the model. The result has set_epoch and __len__.
    """
    import torchvision.transforms as T

    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if train:
        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    else:
        transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    dataset = _image_folder(root, "train" if train else "val", transform)
    return _ImageNetLoader(dataset, train, batch_size, workers, distributed, seed, device)


def _image_folder(root: str, split: str, transform: Callable):
    """torchvision's ImageFolder on <root>/<split>; a missing or empty folder is a DataError."""
    import torchvision.datasets

    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(
            f"imagenet: no {split}/ folder at {folder}; pass --data-root DIR where DIR/train and "
            f"DIR/val hold one sub-folder of JPEGs per class (the ImageFolder layout)"
        )
    try:
        return torchvision.datasets.ImageFolder(folder, transform=transform)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or no images in them
        raise DataError(
            f"imagenet: {folder} is not an ImageFolder ({_one_line(exc)}); it needs one sub-folder "
            f"of images per class"
        ) from exc


def image_folder_size(root: str, split: str) -> int:
    """How many images <root>/<split> holds (a file listing; nothing is decoded)."""
    return len(_image_folder(root, split, transform=None))


def load_image_subset(
    root: str, split: str, indices: torch.Tensor, *, workers: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the images at `indices` of <root>/<split> once, with the evaluation transform
    (Resize 256, CenterCrop 224), into uint8 [n, 3, 224, 224] and int64 labels: the fixed
    evaluation and monitoring sets of a streamed dataset, held in memory like a CIFAR test set."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    subset = torch.utils.data.Subset(_image_folder(root, split, transform), indices.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    if not images:
        return torch.zeros((0, 3, 224, 224), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.cat(images).contiguous(), torch.cat(labels).to(torch.int64)
