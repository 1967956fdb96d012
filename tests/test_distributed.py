"""paper_repro/runtime/distributed.py: data-parallel training with two local gloo processes, no SLURM.

One module fixture spawns two processes (torch.multiprocessing, gloo, world size 2, torchrun-
style variables) that run, in one process group: the gradient arithmetic on an uneven split,
the divergence check, a natural run end to end through the runner, the same run interrupted
after epoch 1 and resumed, and one epoch of every method that takes several backward passes
per step or keeps per-example state (Free AT, YOPO, ATTA, Fast AT with its guard). A worker
that hangs is killed by the fixture's timeout; one that raises fails the fixture.

Tolerance of 2 processes against 1 (same config, same global batch 64 and LR): the averaged
gradient of the two slices equals the full batch's up to float reassociation, except through
BatchNorm, whose batch statistics are per slice (32 images instead of 64), as in DDP without
SyncBN. Each step's gradient therefore differs by a little, and the runs drift apart like two
nearby trajectories. Measured, 2 processes vs 1: this file's config (3 epochs on 512 images)
clean 47.47 vs 46.91 on the 10,000 test images, PGD 26.5 vs 27.5 on 200, per-epoch training
loss within 0.013; the SLURM test's (10 epochs on 1,024) clean 72.95 vs 72.47, PGD 7.0 vs 6.0,
loss within 0.012. We allow 2 pp clean on 10,000 images, 3 pp (6 images) PGD on 200 images,
and 0.05 per-epoch training loss: about 3x the measured gaps. What no tolerance could hide is
checked exactly: the FLOPs of the two ranks add up to one process's (each rank trained on its
half of every batch, not on all of it) and the number of optimiser steps is the same.
"""
from __future__ import annotations

import json
import socket
import traceback
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from paper_repro import results
from paper_repro.training import runner
from paper_repro.store.files import safe_load
from paper_repro.runtime.distributed import DataParallel, World, init_from_environment, split_sizes
from paper_repro.errors import ReproError
from conftest import tiny_config

MULTI_PASS = {  # one epoch each: several backward passes per step, or per-example state
    "free_at": {}, "yopo": {}, "atta": {}, "fast_at": {"method_args": {"early_stop": True}},
    "trades": {}, "at_awp": {},  # AWP: each rank's proxy pass on its slice, then one all-reduce
}


def natural_config(store: Path):
    return tiny_config(store, train_subset=512, epochs=3, eval_n=200)


class Interrupt(Exception):
    pass


def _units(parallel: DataParallel, rank: int) -> dict:
    """Uneven slices (3 + 2 of a batch of 5): the averaged gradient is the full batch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    parallel.sizes = split_sizes(5, 2)
    start = sum(parallel.sizes[:rank])
    mine = slice(start, start + parallel.sizes[rank])
    full = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    parallel.average_gradients([torch.optim.SGD(model.parameters(), lr=0.1)])
    out = {"grad_error": max((p.grad - g).abs().max().item()
                             for p, g in zip(model.parameters(), full)),
           "gather_ok": torch.equal(parallel.gather(x[mine]), x),
           "stop": parallel.end_epoch(model, "stop now" if rank == 0 else None)}
    if rank == 1:  # a weight update that escaped the all-reduce
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-3
    try:
        parallel.end_epoch(model, None)
    except ReproError as e:
        out["diverged"] = str(e)
    return out


def _worker(rank: int, port: int, store: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    store_path = Path(store)
    out: dict = {}
    try:
        world = init_from_environment(torch.device("cpu"))
        out["world"] = [world.rank, world.world_size]
        out["units"] = _units(DataParallel(world, torch.device("cpu")), rank)
        out["natural"] = runner.train_run(natural_config(store_path / "two"), quiet=True)

        real = runner.seed_epoch

        def stop_at_epoch_two(cfg, epoch, rank=0):  # every rank stops, after checkpoint 1
            if epoch == 1:
                raise Interrupt
            real(cfg, epoch, rank)

        runner.seed_epoch = stop_at_epoch_two
        try:
            runner.train_run(natural_config(store_path / "resumed"), quiet=True)
        except Interrupt:
            out["interrupted"] = True
        finally:
            runner.seed_epoch = real
        out["resumed"] = runner.train_run(natural_config(store_path / "resumed"), quiet=True)
        for method, extra in MULTI_PASS.items():
            cfg = tiny_config(store_path / method, method=method, epochs=1, train_subset=128,
                              **extra)
            out[method] = runner.train_run(cfg, quiet=True)
    except BaseException:
        out["error"] = traceback.format_exc()
        raise
    finally:
        (store_path / f"rank{rank}.json").write_text(json.dumps(out, default=str))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of the two ranks returned ({rank: {...}}) and the store they wrote."""
    store = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(store)), nprocs=2, join=False,
                             start_method="spawn")
    import time

    deadline = time.monotonic() + 600
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 600 s (a collective hung?)")
    return {r: json.loads((store / f"rank{r}.json").read_text()) for r in (0, 1)}, store


def test_uneven_slices_average_to_the_full_batch_gradient(two_ranks):
    ranks, _ = two_ranks
    for r in (0, 1):
        units = ranks[r]["units"]
        assert ranks[r]["world"] == [r, 2]
        assert units["grad_error"] < 1e-6
        assert units["gather_ok"]
        assert units["stop"] == "stop now"  # rank 0's decision, on every rank


def test_weights_that_drift_apart_stop_training_on_every_rank(two_ranks):
    ranks, _ = two_ranks
    for r in (0, 1):
        assert "rank(s) [1] differ from rank 0's" in ranks[r]["units"]["diverged"]


def test_two_processes_train_like_one_within_tolerance(two_ranks, tmp_path):
    ranks, store = two_ranks
    two = ranks[0]["natural"]
    assert ranks[1]["natural"] == {"rank": 1, "status": "done", "epochs_done": 3,
                                   "steps_done": two["steps_done"]}
    one = runner.train_run(natural_config(tmp_path), quiet=True)
    assert two["hardware"]["processes"] == 2 and one["hardware"]["processes"] == 1
    assert two["steps_done"] == one["steps_done"] == 3 * 8
    assert two["train_flops"] == one["train_flops"]  # each rank trained on half of each batch
    assert abs(two["clean_acc"] - one["clean_acc"]) <= 2.0, (two["clean_acc"], one["clean_acc"])
    assert abs(two["pgd_acc"] - one["pgd_acc"]) <= 3.0, (two["pgd_acc"], one["pgd_acc"])
    cfg = natural_config(tmp_path)
    curves = [results.load_metrics(results.run_dir(d, cfg.run_path))
              for d in (store / "two", tmp_path)]
    assert list(curves[0].columns) == list(curves[1].columns)
    assert (curves[0]["train_loss"] - curves[1]["train_loss"]).abs().max() <= 0.05
    print(f"2 processes: clean {two['clean_acc']} PGD {two['pgd_acc']}; 1 process: clean "
          f"{one['clean_acc']} PGD {one['pgd_acc']}; max loss gap "
          f"{(curves[0]['train_loss'] - curves[1]['train_loss']).abs().max():.4f}")


def test_two_processes_resume_from_rank_0s_checkpoint_to_the_uninterrupted_result(two_ranks):
    ranks, store = two_ranks
    assert ranks[0]["interrupted"] and ranks[1]["interrupted"]
    straight, resumed = ranks[0]["natural"], ranks[0]["resumed"]
    for key in ("clean_acc", "pgd_acc", "steps_done", "train_flops"):
        assert resumed[key] == straight[key], key
    cfg = natural_config(store)
    curves = [results.load_metrics(results.run_dir(store / d, cfg.run_path))
              .drop(columns=["train_time_s"]) for d in ("two", "resumed")]
    pd.testing.assert_frame_equal(*curves)


@pytest.mark.parametrize("method", list(MULTI_PASS))
def test_methods_with_several_backward_passes_stay_in_sync(two_ranks, method):
    """Completing means the ranks held bitwise equal weights at the end of the epoch (the
    runner checks that: YOPO's extra layer-one backward, Free AT's replays and the attacks'
    input-gradient passes all went through the one all-reduce per optimiser step)."""
    ranks, store = two_ranks
    record = ranks[0][method]
    assert record["status"] == "done" and record["hardware"]["processes"] == 2
    assert ranks[1][method]["steps_done"] == record["steps_done"] > 0
    cfg = tiny_config(store / method, method=method, epochs=1, train_subset=128,
                      **MULTI_PASS[method])
    directory = results.run_dir(store / method, cfg.run_path)
    if method == "fast_at":  # the guard ran (on the whole first batch, on both ranks alike)
        assert results.load_metrics(directory)["guard_pgd_acc"].notna().all()
    if method == "atta":
        # rank 0's store holds the attacked image of EVERY training image, also those rank 1
        # trained on (gathered): the fresh store's 0.001-noise leaves some pixels < 0, an
        # attacked image is in [0, 1]. Rows/columns 8..27 lie in every crop window (pad 4).
        adv = safe_load(directory / "checkpoint.pt")["method"]["adv"]
        assert adv.shape[0] == 128
        assert (adv[:, :, 8:28, 8:28].flatten(1).min(1).values >= 0).all()


def test_one_process_needs_no_process_group(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    assert init_from_environment(torch.device("cpu")) == World()
    assert not torch.distributed.is_initialized()


# --- streamed data: each rank decodes only its slice -----------------------------------------

STREAM_CLASSES = tuple(f"n0{i}" for i in range(7))  # 7 images: global batches of 4 and 3


def _streamed_batches(rank: int, world_size: int, root: str) -> dict:
    """The indices of epoch 1's training batches as the runner builds them (splits.
    train_loader, then DataParallel.shard), the slice sizes, and every image decoded."""
    import torchvision.datasets.folder as folder

    from paper_repro.data import dataset_info
    from paper_repro.data.splits import Data, train_loader

    decoded: list[str] = []
    real = folder.pil_loader
    folder.pil_loader = lambda path: decoded.append(str(Path(path).relative_to(root))) or \
        real(path)
    try:
        world = init_from_environment(torch.device("cpu"))
        assert (world.rank, world.world_size) == (rank, world_size)
        parallel = DataParallel(world, torch.device("cpu"))
        cfg = tiny_config(Path(root) / "store", dataset="imagenet", data_root=root,
                          batch_size=4, arch="resnet50", model_args={})
        empty = torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
        data = Data(dataset_info("imagenet"), *empty, *empty, stream_root=root,
                    stream_train_n=len(STREAM_CLASSES))
        loader = parallel.shard(train_loader(cfg, data, torch.device("cpu"),
                                             (world.rank, world.world_size)))
        loader.set_epoch(1)
        batches = []
        for batch in loader:
            batches.append({"index": batch.index.tolist(), "sizes": list(parallel.sizes)})
        return {"batches": batches, "decoded": decoded, "len": len(loader)}
    finally:
        folder.pil_loader = real


def _stream_worker(rank: int, port: int, root: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), REPRO_WORKERS="0")
    torch.set_num_threads(1)
    out = _streamed_batches(rank, 2, root)
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(out))


def test_two_ranks_decode_one_process_batch_between_them(tmp_path, monkeypatch):
    from test_data import _write_image_folder

    _write_image_folder(tmp_path, classes=STREAM_CLASSES, per_class=1)
    for key in ("WORLD_SIZE", "RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("REPRO_WORKERS", "0")
    one = _streamed_batches(0, 1, str(tmp_path))
    mp.start_processes(_stream_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")  # joins; a rank that raises fails the test
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert [len(b["index"]) for b in one["batches"]] == [4, 3]
    assert ranks[0]["len"] == ranks[1]["len"] == one["len"] == 2
    for i, batch in enumerate(one["batches"]):  # rank 0's slice, then rank 1's, is the batch
        assert ranks[0]["batches"][i]["index"] + ranks[1]["batches"][i]["index"] == \
            batch["index"]
        assert ranks[0]["batches"][i]["sizes"] == ranks[1]["batches"][i]["sizes"] == \
            split_sizes(len(batch["index"]), 2)
    # every image decoded exactly once, by the rank that trains on it
    assert sorted(ranks[0]["decoded"] + ranks[1]["decoded"]) == sorted(one["decoded"])
    assert len(set(one["decoded"])) == len(one["decoded"]) == len(STREAM_CLASSES)
    for r in (0, 1):
        assert len(ranks[r]["decoded"]) == sum(len(b["index"]) for b in ranks[r]["batches"])
