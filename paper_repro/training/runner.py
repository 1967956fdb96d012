"""Train one run: check, prepare, resume, epochs, evaluate, record.

The runner is the same for every method and trains exactly the run it is given: the runs it
needs first (AFT's pre-training, a self-training teacher) come from the graph in pipeline.py and
are trained before it by whoever walks that graph (local.py here, slurm/launcher.py on a
cluster); if one is not done, `train_run` says so in one line. Each step below is a call into a room
named for what it holds: data/splits.py (images), store/checkpoints.py, monitoring.py,
evaluation.py, recorder.py (everything written, on rank 0 only), provenance.py.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from .. import faults
from ..store import files, layout
from ..runtime import fastpath
from . import pipeline
from ..store.checkpoints import (BEST_FILE, TrainingState, load_checkpoint, restore, save_best,
                          save_checkpoint)
from ..config import RunConfig
from ..data import dataset_info
from ..data.splits import Data, load_data, train_loader
from ..runtime.distributed import DataParallel, World, init_from_environment
from ..runtime.environment import resolve_device, seed_epoch, set_determinism
from ..errors import ConfigError, ReproError
from ..robustness.evaluation import best_evaluation, final_evaluation, missing_evaluation, reevaluate
from .flops import TotalFlopCounter
from .methods import Context, Method, get_method
from ..models import build_model
from .monitoring import VAL_SCORE, MonitorSets, ProgressLoader, monitor, monitor_sets
from ..runtime.provenance import code_version, hardware
from .recorder import Recorder, SilentRecorder
from .schedules import Schedule, make_schedule


class TrainingDiverged(ReproError):
    """The training loss became NaN or Inf."""


def train_run(cfg: RunConfig, *, run_path: str | None = None, resume: bool = False,
              quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate this one run; returns its record. Its prerequisites (a pre-training,
    a teacher) must be done: this never trains them (`paper_repro.train`,
    orchestration/local.py, walks the graph). A run already done is not re-run (only
    evaluated again when the config asks for an evaluation its record lacks).

    Bad input, and a prerequisite run that is not done, fail before anything is written; the
    run's folder is locked while it trains. With N processes (paper_repro.runtime.distributed) every
    rank trains on its slice of each batch; rank 0 alone locks, writes files and evaluates, the
    others return a short summary.
    """
    run_path = run_path or cfg.run_path
    directory = layout.run_dir(cfg.results_dir, run_path)
    check_existing(directory, cfg)
    world = init_from_environment(resolve_device(cfg.device))
    parallel = DataParallel(world, world.device(resolve_device(cfg.device)))
    record = layout.read_record(directory)
    if parallel.from_main(_is_done(record)):
        if not world.is_main:
            return {"rank": world.rank, "status": layout.STATUS_DONE}
        return reevaluate(cfg, directory, record) if missing_evaluation(cfg, record) else record

    method = _check(cfg, directory, run_path, resume)
    set_determinism(cfg)
    base_record = {"run_path": run_path, "config_hash": cfg.config_hash(),
                   "cell_hash": cfg.cell_hash(), "method": cfg.method,
                   "hardware": {**hardware(), "processes": world.world_size},
                   "code": code_version(), **fastpath.describe(cfg, parallel.device),
                   # this process's start (a resumed run: the resume); the pool's tests read it
                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "started_at_unix": time.time()}
    recorder_cls = Recorder if world.is_main else SilentRecorder
    recorder = recorder_cls(cfg, directory, run_path, base_record,
                            quiet=quiet or not world.is_main)
    run = _prepare(cfg, run_path, method, parallel, recorder.quiet)
    # nothing above wrote to this run's folder: bad input has failed by now, the store untouched
    with contextlib.ExitStack() as locks:
        record = recorder.open(locks)
        if parallel.from_main(_is_done(record)):  # finished by another process while we set up
            return record if recorder.writes else {"rank": world.rank,
                                                   "status": layout.STATUS_DONE}
        recorder.start()
        parallel.barrier()  # rank 0's checkpoint (if any) is whole before every rank reads it
        checkpoint = load_checkpoint(directory / "checkpoint.pt", cfg)
        state = TrainingState() if checkpoint is None else \
            restore(checkpoint, run.model, run.optimizers, method, run.device)
        parallel.broadcast_model(run.model)
        recorder.running(state)
        _epochs(cfg, run, state, world, parallel, recorder)
        if not recorder.writes:  # back once rank 0 has written the checkpoint and the record
            parallel.barrier()
            return {"rank": world.rank, "status": layout.STATUS_DONE,
                    "epochs_done": state.epoch, "steps_done": state.global_step}
        record = recorder.done(lambda: _final_record(cfg, run, state, base_record,
                                                     recorder.directory))
        parallel.barrier()
        return record


# --- check ---------------------------------------------------------------------------------

def _is_done(record: dict[str, Any] | None) -> bool:
    return bool(record and record.get("status") == layout.STATUS_DONE)


def check_existing(directory: Path, cfg: RunConfig) -> None:
    """Refuse, before anything is written, a run folder that holds another config's run."""
    old = layout.read_json(directory / "config.json")
    if old and old.get("config_hash") != cfg.config_hash():
        raise ReproError(f"{directory} holds a run with another config (hash "
                         f"{old.get('config_hash')} != {cfg.config_hash()}); refusing to "
                         "overwrite it: remove it or use another --results-dir")


def _check(cfg: RunConfig, directory: Path, run_path: str, resume: bool) -> Method:
    """Everything that can be refused before the data loads; returns the method."""
    if resume and not was_started(directory):
        raise ReproError(f"--resume: nothing to resume in {directory} (the run was never "
                         "started); leave out --resume to start it")
    method_cls = get_method(cfg.method)
    if cfg.pretrain is not None and not method_cls.fine_tunes:
        raise ConfigError(f"pretrain is set but method '{cfg.method}' trains from scratch "
                          "(only fine-tuning methods such as aft use a pre-training run)")
    if method_cls.fine_tunes and cfg.pretrain is None and not cfg.init:
        raise ConfigError(f"method '{cfg.method}' fine-tunes: set init (a checkpoint or "
                          "run:<run-path>) or pretrain")
    if method_cls.needs_arrays and not dataset_info(cfg.dataset).in_memory:
        raise ConfigError(f"method '{cfg.method}' keeps state for every training image in "
                          f"memory; dataset '{cfg.dataset}' streams from disk")
    pipeline.check_prerequisites(cfg, run_path)
    _check_writable(directory)
    return method_cls(cfg)


def was_started(directory: Path) -> bool:
    """Whether `--resume` has something to continue in this folder: its config (written before
    the first epoch) or a checkpoint."""
    checkpoint = directory / "checkpoint.pt"
    return any(p.is_file() for p in (directory / "config.json", checkpoint,
                                     files.previous_checkpoint(checkpoint)))


def _check_writable(directory: Path) -> None:
    """Fail early, creating nothing, if the run's folder could not be created or written."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ReproError(f"cannot create {directory}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReproError(f"results folder {existing} is not writable")


# --- prepare -------------------------------------------------------------------------------

@dataclass
class _Run:
    """What a run trains with, built once before its first epoch."""

    data: Data
    model: nn.Module
    method: Method
    optimizers: list[torch.optim.Optimizer]
    loader: Any  # this rank's slice of every batch
    steps_per_epoch: int
    schedule: Schedule
    monitor: MonitorSets
    device: torch.device
    init_source: str
    init_note: str
    pretrain_record: dict[str, Any] | None


def _prepare(cfg: RunConfig, run_path: str, method: Method, parallel: DataParallel,
             quiet: bool) -> _Run:
    """Data, model (with its pre-trained weights), optimisers, loader, schedule, monitoring
    images: everything that can fail on bad input, before the run's folder is touched."""
    device = parallel.device
    labeller = pipeline.pseudo_labeller(cfg, dataset_info(cfg.dataset), run_path) \
        if cfg.extra_data == "pseudo-label" else None
    data = load_data(cfg, labeller)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    model = build_model(cfg, data.info)
    init_source, init_note = pipeline.resolve_init(model, cfg, run_path)
    if init_note and not quiet:
        tqdm.write(f"{run_path}: {init_note}")
    pretrain_record = layout.read_record(Path(init_source)) if init_source and \
        Path(init_source).is_dir() else None
    model.to(device)
    fastpath.prepare_model(model, cfg, device)
    optimizers = method.make_optimizers(model)
    world = parallel.world  # each rank trains on (streamed: decodes) its slice of each batch
    loader = parallel.shard(train_loader(cfg, data, device, (world.rank, world.world_size)))
    schedule = make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs,
                             **cfg.schedule_args)
    return _Run(data, model, method, optimizers, loader,
                method.optimizer_steps_per_epoch(len(loader)), schedule,
                monitor_sets(cfg, data, device), device, init_source, init_note,
                pretrain_record)


# --- epochs --------------------------------------------------------------------------------

def _epochs(cfg: RunConfig, run: _Run, state: TrainingState, world: World,
            parallel: DataParallel, recorder: Recorder) -> None:
    """Train from `state.epoch` to the last epoch (or the method's own stop); after each
    epoch the recorder monitors, checkpoints and writes the metrics."""
    model, method, loader, device = run.model, run.method, run.loader, run.device
    bar = tqdm(total=cfg.epochs * len(loader), initial=state.epoch * len(loader), unit="batch",
               desc=recorder.run_path, disable=recorder.quiet or not sys.stderr.isatty(),
               leave=False)
    ctx = Context(model=model, optimizers=run.optimizers, schedule=run.schedule,
                  loader=ProgressLoader(loader, bar), cfg=cfg, device=device, epoch=state.epoch,
                  steps_per_epoch=run.steps_per_epoch, global_step=state.global_step,
                  lr_log=state.lr_log,
                  average_gradients=parallel.average_gradients if parallel.active else None,
                  gather=parallel.gather)
    for epoch in range(state.epoch, cfg.epochs):
        if ctx.done or state.stop_reason:
            break
        ctx.epoch = epoch
        seed_epoch(cfg, epoch, world.rank)
        # every epoch starts in train mode, whatever the last epoch's monitoring left (eval),
        # so that an epoch never depends on whether the run was resumed before it
        model.train()
        loader.set_epoch(epoch)
        lr_start = ctx.current_lr()
        t0 = time.perf_counter()
        with fastpath.autocast(cfg, device):  # bf16 on the GPU; evaluation stays fp32
            if state.flops_per_epoch is None:  # count one epoch on the real code path
                with TotalFlopCounter() as counter, fastpath.eager(cfg):
                    stats = method.train_epoch(ctx)
                state.flops_per_epoch = parallel.total(int(counter.get_total_flops()))
            else:
                stats = method.train_epoch(ctx)
        fastpath.synchronize(device)
        state.train_time_s += time.perf_counter() - t0
        stats = parallel.mean(stats)
        if not all(torch.isfinite(torch.tensor(v)) for v in stats.values()):
            recorder.fail(epoch, f"non-finite training metrics {stats}")
            raise TrainingDiverged(f"{recorder.run_path}: training diverged at epoch "
                                   f"{epoch + 1} (loss {stats.get('train_loss')}); last good "
                                   "checkpoint kept")
        ctx.stop_reason = parallel.end_epoch(model, ctx.stop_reason)
        state.epoch, state.global_step, state.stop_reason = \
            epoch + 1, ctx.global_step, ctx.stop_reason
        recorder.end_epoch(
            state,
            row=lambda: {"epoch": epoch + 1, "lr": lr_start, "step": ctx.global_step, **stats,
                         **monitor(model, run.monitor, cfg, device),
                         "train_time_s": round(state.train_time_s, 3)},
            save_checkpoint=lambda: save_checkpoint(recorder.directory / "checkpoint.pt", cfg,
                                                    model, run.optimizers, method, state),
            save_best=lambda: save_best(recorder.directory / BEST_FILE, cfg, model, state))
    bar.close()


# --- evaluate and record -------------------------------------------------------------------

def _final_record(cfg: RunConfig, run: _Run, state: TrainingState, base_record: dict[str, Any],
                  directory: Path) -> dict[str, Any]:
    """The table protocol on the trained model (and on its best epoch's, where it kept one),
    and everything the tables and figures read."""
    t_eval = time.perf_counter()
    test = (run.monitor.test_x, run.monitor.test_y)
    final = final_evaluation(run.model, *test, cfg, run.device)
    best = best_evaluation(run.model, directory, final, state.epoch, *test, cfg, run.device)
    faults.point("eval")  # test-only (faults.py): no-op unless REPRO_FAULT names it
    pretrain = run.pretrain_record or {}
    last = state.metrics[-1] if state.metrics else {}
    # the final model's validation scores: what a hyper-parameter sweep selects on (not test)
    validation = {k: last[k] for k in ("val_clean_acc", VAL_SCORE) if k in last}
    return {
        **base_record, **final, **best, **validation,
        "status": layout.STATUS_DONE,
        "epochs_done": state.epoch, "steps_done": state.global_step,
        "steps_per_epoch": run.steps_per_epoch, "stopped_early": state.stop_reason,
        "train_time_s": round(state.train_time_s, 3),
        "train_minutes": round(state.train_time_s / 60, 3),
        "eval_time_s": round(time.perf_counter() - t_eval, 3),
        "train_flops": (state.flops_per_epoch or 0) * state.epoch,
        "flops_note": "FLOPs counted with torch.utils.flop_counter over epoch 1, times epochs",
        "pretrain_source": run.init_source, "init_note": run.init_note or None,
        "pretrain_minutes": pretrain.get("train_minutes"),
        "pretrain_flops": pretrain.get("train_flops"),
        "train_images": run.data.num_train,
        "eps": cfg.eps, "train_eps": cfg.train_eps if cfg.train_eps is not None else cfg.eps,
        "eval_alpha": cfg.eval_alpha_value,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished_at_unix": time.time(),
    }
