"""Data-parallel training over N processes: one per GPU (NCCL), or N CPU processes (gloo).

    world = init_from_environment(device)     rank, world size; the process group, when N > 1
    parallel = DataParallel(world, device)    what the runner needs to train with N ranks
    parallel.shard(loader)                    each rank takes its slice of every global batch
    parallel.average_gradients(optimizers)    before every optimiser step (Context.step)
    parallel.end_epoch(model, stop_reason)    ranks agree on weights, BN buffers and stopping

Where N comes from, in this order: a submitit job with N tasks (SLURM or submitit's local
executor; `submitit.helpers.TorchDistributedEnvironment` exports MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK), torchrun-style variables already set (RANK, WORLD_SIZE, MASTER_ADDR),
else one process. submitit is imported only inside a submitit job: training never needs it.

The recipe does not change with N (the paper-scale recipes fix the global batch size):
- The global batch stays `cfg.batch_size` and the LR stays `cfg.lr`. Every rank iterates the
  same seeded permutation of the same epoch and takes a contiguous slice of each global batch,
  so the N slices of step t are exactly the examples of step t of a 1-process run.
- The gradient of step t is the gradient of the global batch's mean loss: each rank's gradient
  (of its slice's mean loss) is weighted by its share of the batch and summed over the ranks.
  Equal slices make this the plain average, as in DDP. It equals the 1-process gradient up to
  float reassociation, except through BatchNorm (next point).
- BatchNorm is plain, per rank: batch statistics over the rank's slice, as DDP without SyncBN
  (the reference repositories do not use SyncBN). Rank 0's running statistics are copied to
  every rank at each epoch's end (DDP's `broadcast_buffers` idea, once per epoch); rank 0's
  model is the one checkpointed and evaluated.

Why gradients are averaged at the optimiser step, not by wrapping the model in
`DistributedDataParallel`: DDP all-reduces inside the backward of a forward of its wrapper.
Several methods take gradients outside that path: YOPO's layer-one Hamiltonian backward calls
`model.stem` directly (DDP would silently leave that gradient un-reduced and the ranks would
drift apart), Free AT and YOPO call backward several times per step, attacks run forwards with
frozen weights (with DDP each of them is a buffer broadcast, a collective that hangs when only
rank 0 evaluates), and methods reach into the model (`model.stem`, `state_dict()` for Fast
AT's guard) where a wrapper would rename everything `module.*`. Averaging the accumulated
gradients once, right before `optimizer.step()`, is DDP's arithmetic for every method without
touching any of them; what it gives up is overlapping the all-reduce with the backward pass,
which is small next to the k attack passes of adversarial training.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError, ReproError

# minutes a rank may wait in a collective (the others wait while rank 0 evaluates alone)
TIMEOUT_ENV = "REPRO_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoints, records and metrics, and evaluates."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank's device: cuda:local_rank on GPUs (modulo the GPUs this task sees)."""
        if device.type != "cuda" or self.world_size == 1:
            return device
        return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))


def _from_submitit() -> bool:
    """Inside a submitit job with more than one task: export its torch.distributed variables."""
    executor = os.environ.get("SUBMITIT_EXECUTOR", "")
    tasks = {"slurm": "SLURM_NTASKS", "local": "SUBMITIT_LOCAL_NTASKS"}.get(executor)
    if tasks is None or int(os.environ.get(tasks, "1")) <= 1:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    # overwrite: variables inherited from a launching job are stale; CUDA_VISIBLE_DEVICES is
    # left alone (World.device picks the GPU by local rank)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True


def init_from_environment(device: torch.device) -> World:
    """Join the run's process group (once per process) and say which rank this is.

    Backend: NCCL when the run trains on CUDA, gloo on the CPU. A single process (no submitit
    job with N > 1 tasks, no WORLD_SIZE > 1) gets World() and no process group.
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if not _from_submitit() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                          "not set (launch with torchrun, or as a submitit job with N tasks)")
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.device(device))
    minutes = float(os.environ.get(TIMEOUT_ENV, "120"))
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size,
                            timeout=datetime.timedelta(minutes=minutes))
    return world


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def split_sizes(batch: int, world_size: int) -> list[int]:
    """The contiguous slice sizes of a batch, rank 0 first (torch.tensor_split's)."""
    return [batch // world_size + (r < batch % world_size) for r in range(world_size)]


class ShardedLoader:
    """Rank r's contiguous slice of every global batch of `loader` (same seed on every rank).

    A last partial batch with fewer examples than ranks is skipped on every rank (a rank with
    no examples has no mean loss); with drop_last (the default) there is none. A loader that
    already yields only this rank's slice (`shards_batches`: streamed data, where each rank
    decodes only its own images) is passed through; only the slice sizes are recorded.
    """

    def __init__(self, loader: Any, parallel: "DataParallel") -> None:
        self.loader, self.parallel = loader, parallel
        self.total = len(loader) if parallel.world.world_size == 1 else sum(
            1 for i in range(len(loader)) if self._batch_len(i) >= parallel.world.world_size)

    def _batch_len(self, i: int) -> int:
        n, b = self.loader.num_samples, self.loader.batch_size
        return min(b, n - i * b)

    def __iter__(self) -> Iterator[Any]:
        rank, world_size = self.parallel.world.rank, self.parallel.world.world_size
        if getattr(self.loader, "shards_batches", False):
            for i, batch in enumerate(self.loader):
                self.parallel.sizes = split_sizes(self._batch_len(i), world_size)
                yield batch
            return
        for batch in self.loader:
            sizes = split_sizes(len(batch.y), world_size)
            if sizes[-1] == 0:
                continue
            self.parallel.sizes = sizes
            start = sum(sizes[:rank])
            yield type(batch)(*(t[start:start + sizes[rank]] for t in batch))

    def __len__(self) -> int:
        return self.total

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class DataParallel:
    """The collectives of one data-parallel run. With one rank every method is a no-op."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world, self.device = world, device
        self.sizes: list[int] = [1] * world.world_size  # slice sizes of the current batch

    @property
    def active(self) -> bool:
        return self.world.world_size > 1

    def shard(self, loader: Any) -> Any:
        if not self.active:
            return loader
        if loader.batch_size < self.world.world_size:
            raise ConfigError(f"batch_size {loader.batch_size} is smaller than the "
                              f"{self.world.world_size} processes it is split across")
        return ShardedLoader(loader, self)

    def average_gradients(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Replace each rank's gradients by the global batch's: Σ_r (b_r / B)·g_r, one
        all-reduce per dtype. Every rank has gradients for the same parameters (same code,
        same model); a parameter without one is left alone, as the optimiser leaves it."""
        if not self.active:
            return
        share = self.sizes[self.world.rank] / sum(self.sizes)
        seen: set[int] = set()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None and id(p) not in seen:
                        seen.add(id(p))
                        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(grads).mul_(share)
            dist.all_reduce(flat)
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The current global batch's tensor from every rank's slice of it, in batch order
        (for method state kept per example, e.g. ATTA's stored images)."""
        if not self.active:
            return t
        most = max(self.sizes)
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:len(t)] = t
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, self.sizes)])

    def mean(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-epoch training statistics averaged over the ranks (same keys on every rank)."""
        if not self.active:
            return stats
        keys = list(stats)  # the method's order, the same on every rank
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(values)
        return {k: v / self.world.world_size for k, v in zip(keys, values.tolist())}

    def total(self, count: int) -> int:
        """Sum of an integer over the ranks (FLOPs: each rank counts its own slice)."""
        if not self.active:
            return count
        value = torch.tensor([count], dtype=torch.float64, device=self.device)
        dist.all_reduce(value)
        return int(value.item())

    def from_main(self, obj: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda"
                                   else None)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (the others wait while rank 0 evaluates and writes)."""
        if self.active:
            dist.all_reduce(torch.zeros(1, device=self.device))

    def broadcast_model(self, model: nn.Module) -> None:
        """Every rank starts from rank 0's weights and buffers (as DDP's constructor does)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def end_epoch(self, model: nn.Module, stop_reason: str | None) -> str | None:
        """Check that the ranks still hold the same weights, give every rank rank 0's BN
        buffers, and return rank 0's decision to stop (e.g. Fast AT's guard).

        Identical gradients and optimiser states give bitwise identical weights; a difference
        means a gradient escaped the all-reduce, and training on would average unrelated models.
        """
        if not self.active:
            return stop_reason
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
            sums = sums.to(self.device)
            every = [torch.empty_like(sums) for _ in range(self.world.world_size)]
            dist.all_gather(every, sums)
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)
        differ = [r for r, s in enumerate(every) if not torch.equal(s, every[0])]
        if differ:
            raise ReproError(f"data parallel: the weights of rank(s) {differ} differ from rank "
                             "0's: a gradient was not averaged across the ranks")
        return self.from_main(stop_reason)
