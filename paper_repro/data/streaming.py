"""Training batches streamed from an ImageFolder through decoding processes (ImageNet), seeded per
epoch like the in-memory ArrayLoader."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.utils.data

from paper_repro.data.image_folder import image_folder
from paper_repro.data.loader import Batch, EpochSeeded, epoch_seed
from paper_repro.errors import ConfigError


class _IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so each item also carries its index (module level, so workers can pickle it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


class RankSlices(torch.utils.data.Sampler):
    """Rank r's contiguous slice of every global batch of one seeded permutation: with N
    data-parallel processes each decodes only its own images, and the N slices together are
    exactly the batch one process would draw (the same permutation, the same generator draws,
    the slice sizes of distributed.split_sizes). A last batch with fewer images than ranks is
    skipped, as ShardedLoader skips it for in-memory data."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int,
                 generator: torch.Generator) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.generator = generator

    def _global_batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world_size)

    def __len__(self) -> int:
        return self._global_batches()

    def __iter__(self) -> Iterator[list[int]]:
        from paper_repro.runtime.distributed import split_sizes

        order = torch.randperm(self.n, generator=self.generator).tolist()  # as RandomSampler
        for i in range(self._global_batches()):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            sizes = split_sizes(len(batch), self.world_size)
            start = sum(sizes[:self.rank])
            yield batch[start:start + sizes[self.rank]]


class _ImageNetLoader(EpochSeeded):
    """A DataLoader that yields Batch and is seeded per epoch like ArrayLoader.

    Batches stay on the CPU (pinned when CUDA is available) unless `device` is given, then they
    move there (non-blocking from pinned memory) as they are drawn.
    The shuffle order and the workers' base seed come from a generator reseeded from (seed, epoch);
    with workers=0 the transforms draw from torch's global RNG instead. With `shard` =
    (rank, world_size) it yields only this rank's slice of each global training batch
    (`RankSlices`); `shards_batches` tells distributed.ShardedLoader not to slice again.
    """

    def __init__(self, dataset, train: bool, batch_size: int, workers: int,
                 shard: tuple[int, int] | None, seed: int, device: torch.device | None = None):
        self.seed, self.batch_size, self.device = seed, batch_size, device
        self._epoch = 0
        self._generator = torch.Generator()
        self._generator.manual_seed(epoch_seed(seed, 0))
        self.dataset = _IndexedDataset(dataset)
        self.shards_batches = shard is not None and shard[1] > 1
        batching: dict = {"batch_size": batch_size}
        if self.shards_batches:
            if not train:
                raise ConfigError("only training batches are sharded across ranks (the "
                                  "evaluation subset is decoded once, on rank 0)")
            batching = {"batch_sampler": RankSlices(len(self.dataset), batch_size, shard[0],
                                                    shard[1], self._generator)}
        elif train:
            batching["sampler"] = torch.utils.data.RandomSampler(self.dataset,
                                                                 generator=self._generator)
        else:
            batching["sampler"] = torch.utils.data.SequentialSampler(self.dataset)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            **batching,
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

    def __iter__(self) -> Iterator[Batch]:
        self._generator.manual_seed(epoch_seed(self.seed, self._take_epoch()))
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
    shard: tuple[int, int] | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> Iterable[Batch]:
    """ImageFolder on <root>/train or <root>/val, yielding Batch of [0,1] images.

    train: RandomResizedCrop(224) + RandomHorizontalFlip; val: Resize(256) + CenterCrop(224).
    No Normalize: normalisation lives in the model. The result has set_epoch and __len__.
    `shard` = (rank, world_size): this rank's slice of every training batch, decoded alone.
    """
    import torchvision.transforms as T

    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if train:
        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    else:
        transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    dataset = image_folder(root, "train" if train else "val", transform)
    return _ImageNetLoader(dataset, train, batch_size, workers, shard, seed, device)
