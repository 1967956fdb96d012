"""The dataset registry: what each dataset is (classes, channels, size, mean/std) and whether it
fits in memory, plus the checks and messages every on-disk reader shares."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from paper_repro.errors import ConfigError, DataError


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
    # split sizes, the one place they are typed (bench's epochs, plan's costs, export's counts)
    train_size: int  # images of the training split (ImageNet: train; ti500k: all of them)
    test_size: int   # images of the test split (ImageNet: val; 0: no test split)


CIFAR10_CLASSES = (
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
                    CIFAR10_CLASSES, in_memory=True, train_size=50_000, test_size=10_000),
        DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    _CIFAR100_CLASSES, in_memory=True, train_size=50_000, test_size=10_000),
        DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
                    _FASHION_MNIST_CLASSES, in_memory=True, train_size=60_000, test_size=10_000),
        DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    (), in_memory=False, train_size=1_281_167, test_size=50_000),
    )
}
# Extra training data (RunConfig.extra_data), not a dataset of its own: Carmon et al.'s
# pseudo-labelled 500K Tiny Images, CIFAR-10's classes ("pseudo-label" is sized by extra_data_n).
EXTRA_DATA: dict[str, DatasetInfo] = {
    "ti500k": DatasetInfo("ti500k", 10, 3, 32, (), (), CIFAR10_CLASSES, in_memory=True,
                          train_size=500_000, test_size=0),
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



def one_line(text: object) -> str:
    """Collapse an embedded exception message to one line (our errors are single-line)."""
    return " ".join(str(text).split())


def check_arrays(info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor, where: str) -> None:
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


def torchvision_download(name: str, cls_name: str, root: str, train: bool) -> None:
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, cls_name)(root, train=train, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise DataError(
            f"{name}: torchvision download into {root} failed ({one_line(exc)}); download it on "
            f"a machine with internet and pass --data-root DIR"
        ) from exc


DEFAULT_DATA_ROOT = "data"  # used when neither root nor $REPRO_DATA is given


def resolve_data_root(root: str | None) -> str:
    """Where datasets are found: `root` (the CLI's --data-root), else $REPRO_DATA, else ./data."""
    return root or os.environ.get("REPRO_DATA") or DEFAULT_DATA_ROOT
