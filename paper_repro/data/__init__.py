"""Datasets: a registry, one reader per on-disk format, and loaders of [0,1] images.

Every loader yields `Batch(x, y, index)` with x float32 in [0,1]; mean/std normalisation is the
model's first layer (DESIGN §4). The in-memory datasets (cifar10, cifar100, fashion-mnist) are read
once into uint8 tensors by `load_arrays` and served by `ArrayLoader`, which keeps them on the device
and does random crop + flip for the whole batch in one vectorised op (airbench's `CifarLoader` idea).
ImageNet streams from an ImageFolder through `make_imagenet_loader`.

    registry.py       what each dataset is (DatasetInfo), shared checks and messages
    cifar.py          CIFAR-10/100 python pickle batches (torchvision's format)
    idx.py            Fashion-MNIST IDX files (Debian's dataset-fashion-mnist)
    ti500k.py         Carmon et al.'s pseudo-labelled 500K Tiny Images pickle
    image_folder.py   ImageNet's ImageFolder layout
    arrays.py         load_arrays: a whole split of an in-memory dataset
    loader.py         ArrayLoader and Augment: batched crop/flip on the device
    streaming.py      make_imagenet_loader: batches decoded by worker processes
    splits.py         which images a run trains, monitors and is evaluated on

Where things are found: `root` (the CLI's --data-root), else $REPRO_DATA, else ./data.
Fashion-MNIST also falls back to the Debian package dataset-fashion-mnist. Nothing is downloaded
unless `download=True`. Every user-facing problem raises DataError or ConfigError with one line.
"""

from paper_repro.data.arrays import load_arrays
from paper_repro.data.image_folder import image_folder_size, load_image_subset
from paper_repro.data.loader import ArrayLoader, Augment, Batch
from paper_repro.data.registry import DatasetInfo, dataset_info, list_datasets
from paper_repro.data.streaming import make_imagenet_loader
from paper_repro.data.ti500k import load_ti500k

__all__ = ["ArrayLoader", "Augment", "Batch", "DatasetInfo", "dataset_info", "image_folder_size",
           "list_datasets", "load_arrays", "load_image_subset", "load_ti500k",
           "make_imagenet_loader"]
