"""ImageNet's on-disk format: torchvision's ImageFolder (one sub-folder of JPEGs per class)."""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.utils.data

from paper_repro.data.registry import one_line
from paper_repro.errors import DataError

def image_folder(root: str, split: str, transform: Callable):
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
            f"imagenet: {folder} is not an ImageFolder ({one_line(exc)}); it needs one sub-folder "
            f"of images per class"
        ) from exc


def image_folder_size(root: str, split: str) -> int:
    """How many images <root>/<split> holds (a file listing; nothing is decoded)."""
    return len(image_folder(root, split, transform=None))


def load_image_subset(
    root: str, split: str, indices: torch.Tensor, *, workers: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the images at `indices` of <root>/<split> once, with the evaluation transform
    (Resize 256, CenterCrop 224), into uint8 [n, 3, 224, 224] and int64 labels: the fixed
    evaluation and monitoring sets of a streamed dataset, held in memory like a CIFAR test set."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    subset = torch.utils.data.Subset(image_folder(root, split, transform), indices.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    if not images:
        return torch.zeros((0, 3, 224, 224), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.cat(images).contiguous(), torch.cat(labels).to(torch.int64)
