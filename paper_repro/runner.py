"""Build everything from a RunConfig, drive a method epoch by epoch, evaluate, record.

The runner is the same for every method: data, model, optimisers, schedule, per-epoch
monitoring, atomic checkpoints, resume, the final evaluation protocol and the record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from .flops import TotalFlopCounter
from tqdm import tqdm

from . import fastpath, faults, results
from .config import EVALUATION_FIELDS, RunConfig, build_config
from .data import (Augment, ArrayLoader, DatasetInfo, dataset_info, image_folder_size,
                   load_arrays, load_image_subset, load_ti500k, make_imagenet_loader)
from .distributed import DataParallel, init_from_environment
from .errors import CheckpointError, ConfigError, ReproError
from .evaluation import AA_VERSION, clean_accuracy, evaluate, fixed_subset, pgd_accuracy
from .methods import Context, Method, get_method
from .models import ImageClassifier, create_model
from .pretrained import apply_init, safe_load
from .schedules import make_schedule

_DATA_SEED = 0  # the labelled subset and the held-out pool are the same for every run


class TrainingDiverged(ReproError):
    """The training loss became NaN or Inf."""


# --- setup ---------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device '{name}' (valid: auto, cpu, cuda, "
                          "cuda:<index>)") from None


def set_determinism(cfg: RunConfig) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def seed_epoch(cfg: RunConfig, epoch: int, rank: int = 0) -> None:
    """Every source of randomness of epoch e is a function of (seed, e): resume is exact.
    Data-parallel ranks > 0 draw their own streams (attack starts differ per slice)."""
    s = cfg.seed * 100_003 + epoch + rank * 1_000_000_007
    torch.manual_seed(s)
    random.seed(s)


@dataclass
class Data:
    """A run's images. In-memory datasets hold their whole train and test splits here; a
    streamed one (ImageNet) holds only its fixed evaluation subset of val (`test_*`) and its
    monitoring subset of train (`train_*`), and its training batches stream from `stream_root`."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    stream_root: str | None = None
    stream_train_n: int = 0

    @property
    def num_train(self) -> int:
        return self.stream_train_n if self.stream_root else len(self.train_y)


def stream_workers() -> int:
    """Decoding processes of a streamed dataset ($REPRO_WORKERS, default up to 8)."""
    return int(os.environ.get("REPRO_WORKERS") or min(8, os.cpu_count() or 1))


def load_data(cfg: RunConfig) -> Data:
    """Train (the labelled subset, plus extra data for pre-training) and test arrays."""
    info = dataset_info(cfg.dataset)
    if not info.in_memory:
        return load_streamed_data(cfg, info)
    train_x, train_y = load_arrays(cfg.dataset, cfg.data_root, train=True)
    test_x, test_y = load_arrays(cfg.dataset, cfg.data_root, train=False)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(_DATA_SEED))
    n_labelled = len(order) if cfg.train_subset is None else cfg.train_subset
    if n_labelled + cfg.extra_data_n > len(order):
        raise ConfigError(f"train_subset + extra_data_n = {n_labelled + cfg.extra_data_n} "
                          f"exceeds the {len(order)} training images of {cfg.dataset}")
    labelled = order[:n_labelled]
    x, y = train_x[labelled], train_y[labelled]
    if cfg.extra_data == "pseudo-label":
        pool = order[n_labelled:n_labelled + cfg.extra_data_n]
        extra_x = train_x[pool]
        extra_y = pseudo_labels(cfg, info, extra_x)
        x, y = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    elif cfg.extra_data == "ti500k":
        if not cfg.extra_data_path:
            raise ConfigError("extra_data = 'ti500k' needs extra_data_path (the pickle)")
        extra_x, extra_y = load_ti500k(cfg.extra_data_path)
        x, y = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    return Data(info, x.contiguous(), y.contiguous(), test_x, test_y)


def load_streamed_data(cfg: RunConfig, info: DatasetInfo) -> Data:
    """ImageNet: the training set streams from <data_root>/train through worker processes;
    the evaluation images (a fixed subset of eval_n val images, the same for every row) and the
    monitoring images (monitor_n train images) are decoded once with the evaluation transform."""
    for key, bad in (("train_subset", cfg.train_subset is not None),
                     ("extra_data", cfg.extra_data is not None)):
        if bad:
            raise ConfigError(f"{key} is not supported for the streamed dataset "
                              f"'{cfg.dataset}' (it trains on the whole train/ folder)")
    root = _stream_root(cfg)
    n_train = image_folder_size(root, "train")  # a listing of the folder; nothing decoded
    test_x, test_y = load_test_set(cfg)
    train_x, train_y = load_image_subset(root, "train", fixed_subset(n_train, cfg.monitor_n),
                                         workers=stream_workers())
    return Data(info, train_x, train_y, test_x, test_y, stream_root=root, stream_train_n=n_train)


def load_test_set(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the final evaluation sees (re-evaluation reads only these)."""
    info = dataset_info(cfg.dataset)
    if info.in_memory:
        return load_arrays(cfg.dataset, cfg.data_root, train=False)
    root = _stream_root(cfg)
    return load_image_subset(root, "val", fixed_subset(image_folder_size(root, "val"),
                                                       cfg.eval_n), workers=stream_workers())


def _stream_root(cfg: RunConfig) -> str:
    return cfg.data_root or os.environ.get("REPRO_DATA") or "data"


def train_loader(cfg: RunConfig, data: Data, device: torch.device) -> Any:
    """Seeded minibatches on the device: batched crop/flip on in-memory arrays (ArrayLoader),
    or ImageNet's RandomResizedCrop + flip decoded by worker processes."""
    if data.stream_root is not None:
        return make_imagenet_loader(data.stream_root, True, cfg.batch_size,
                                    workers=stream_workers(), seed=cfg.seed, device=device)
    return ArrayLoader(data.train_x, data.train_y, batch_size=cfg.batch_size, shuffle=True,
                       augment=Augment(pad=cfg.augment_pad, pad_mode=cfg.augment_pad_mode,
                                       pad_value=cfg.augment_pad_value, flip=cfg.augment_flip),
                       drop_last=cfg.drop_last and len(data.train_y) >= cfg.batch_size,
                       device=device, seed=cfg.seed)


def pseudo_labels(cfg: RunConfig, info: DatasetInfo, images: torch.Tensor) -> torch.Tensor:
    """Self-training (the cpu stand-in of Carmon et al.'s +500K): a teacher trained on the
    labelled subset labels the held-out images with its predictions."""
    teacher_cfg = teacher_config(cfg)
    teacher_dir = ensure_pretrained(teacher_cfg)
    device = resolve_device(cfg.device)
    teacher = build_model(teacher_cfg, info).to(device)
    load_weights(teacher, teacher_dir / "checkpoint.pt")
    teacher.eval()
    labels = []
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            x = images[start:start + 1000].to(device).float().div_(255)
            labels.append(teacher(x).argmax(1).cpu())
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)


def teacher_config(cfg: RunConfig) -> RunConfig:
    """The self-training teacher of a pseudo-label pre-training: the same run without the extra
    data (so it is the plain AFT row's pre-training, reused by hash)."""
    return dataclasses.replace(cfg, extra_data=None, extra_data_n=0, extra_data_path=None)


def build_model(cfg: RunConfig, info: DatasetInfo) -> ImageClassifier:
    return create_model(cfg.arch, num_classes=info.num_classes, in_channels=info.channels,
                        mean=info.mean, std=info.std, **cfg.model_args)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load model weights from our checkpoint or a plain state dict, safely (weights_only)."""
    state = safe_load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(f"{path}: does not fit this architecture "
                              f"({_state_mismatch(model.state_dict(), state)})") from None


def _state_mismatch(want: dict[str, Any], got: dict[str, Any]) -> str:
    """One line on how a state dict differs from the model's: missing, unexpected, reshaped."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    reshaped = [f"{k} {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in want
                if k in got and hasattr(got[k], "shape") and got[k].shape != want[k].shape]
    parts = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in
             (("missing keys", missing), ("unexpected keys", unexpected),
              ("tensors of another shape", reshaped)) if items]
    return "; ".join(parts) or "incompatible tensors"


def resolve_init(model: nn.Module, cfg: RunConfig) -> tuple[str, str]:
    """Start from pre-trained weights: `init` (any form of pretrained.py) or the pre-training
    run. Returns (source, note); the note says what was adapted, e.g. a replaced head."""
    if cfg.init:
        loaded = apply_init(model, cfg.init, results_dir=cfg.results_dir, arch=cfg.arch)
        return loaded.source, loaded.note
    if cfg.pretrain is not None:
        directory = ensure_pretrained(pretrain_config(cfg))
        load_weights(model, directory / "checkpoint.pt")
        return str(directory), ""
    return "", ""


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """The natural pre-training run of an AFT row: the natural recipe on the row's data and
    model, then the row's `pretrain` overrides. Stored under pretrain/<hash> and reused."""
    recipe = get_method("natural").recipe
    inherited = {k: getattr(cfg, k) for k in (
        "dataset", "data_root", "train_subset", "arch", "model_args", "seed", "device",
        "deterministic",
        "results_dir", "eval_steps", "eval_alpha", "eval_n", "eval_batch", "monitor_n",
        "monitor_steps", "eps", "augment_pad", "augment_flip", "max_steps",
        "precision", "channels_last", "compile", "eval_checks")}
    child = build_config(("natural recipe", recipe), ("AFT row", inherited),
                         ("no AutoAttack on a pre-training", {"aa_n": 0}),
                         ("pretrain", cfg.pretrain or {}), experiment="pretrain", row="pretrain",
                         scale=cfg.scale, seed=cfg.seed, method="natural")
    return child


def ensure_pretrained(cfg: RunConfig) -> Path:
    """The run directory of a finished pre-training run with this config, training it if needed."""
    path = results.pretrain_path(cfg.scale, cfg.config_hash())
    directory = results.run_dir(cfg.results_dir, path)
    if not results.is_done(directory):
        train(cfg, run_path=path)
    elif not (directory / "checkpoint.pt").is_file():
        # a fresh clone: the records are committed, the weights never are
        raise CheckpointError(
            f"pre-training run {path} is done but its checkpoint.pt is not in {directory} "
            "(checkpoints are not kept in git): copy it back, or move that folder away to train "
            "the pre-training again (runs already fine-tuned from it keep their records)")
    return directory


# --- provenance ----------------------------------------------------------------------------

def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def code_version(root: Path = Path(__file__).resolve().parent.parent) -> dict[str, Any]:
    """The checkout's commit and whether its code differs from it (results/ aside)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    import numpy
    import torchvision
    return {"git_sha": git("rev-parse", "HEAD") or "unknown",
            # the code's state: runs written into results/ do not make the code dirty
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)results")),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "os": platform.platform()}


# --- the training loop ---------------------------------------------------------------------

class _Progress:
    """Wraps the loader so a progress bar with ETA ticks per batch."""

    def __init__(self, loader: ArrayLoader, bar: tqdm) -> None:
        self.loader, self.bar = loader, bar

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update(1)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _check_existing(directory: Path, cfg: RunConfig) -> None:
    old = results.read_json(directory / "config.json")
    if old and old.get("config_hash") != cfg.config_hash():
        raise ReproError(f"{directory} holds a run with another config (hash "
                         f"{old.get('config_hash')} != {cfg.config_hash()}); refusing to "
                         "overwrite it: remove it or use another --results-dir")


def train(cfg: RunConfig, *, run_path: str | None = None, resume: bool = False,
          quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate one run; returns its record. A run already done is not re-run (only
    evaluated again when the config asks for an evaluation its record lacks).

    Bad input fails before anything is written; the run's folder is locked while it trains.
    With N processes (paper_repro.distributed) every rank trains on its slice of each batch;
    rank 0 alone locks, writes files and evaluates, the others return a short summary.
    """
    with contextlib.ExitStack() as locks:
        return _train(cfg, run_path=run_path, resume=resume, quiet=quiet, locks=locks)


def _train(cfg: RunConfig, *, run_path: str | None, resume: bool, quiet: bool,
           locks: contextlib.ExitStack) -> dict[str, Any]:
    run_path = run_path or cfg.run_path
    directory = results.run_dir(cfg.results_dir, run_path)
    _check_existing(directory, cfg)
    world = init_from_environment(resolve_device(cfg.device))
    parallel = DataParallel(world, world.device(resolve_device(cfg.device)))
    record = results.read_record(directory)
    if parallel.from_main(bool(record and record.get("status") == results.STATUS_DONE)):
        if not world.is_main:
            return {"rank": world.rank, "status": results.STATUS_DONE}
        if missing_evaluation(cfg, record):
            return reevaluate(cfg, directory, record)  # rank 0 alone evaluates
        return record
    quiet = quiet or not world.is_main
    checkpoint_path = directory / "checkpoint.pt"
    if resume and not _was_started(cfg, directory):
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
    method: Method = method_cls(cfg)
    set_determinism(cfg)
    device = parallel.device

    _check_writable(directory)
    base_record = {"run_path": run_path, "config_hash": cfg.config_hash(),
                   "cell_hash": cfg.cell_hash(), "method": cfg.method,
                   "hardware": {**hardware(), "processes": world.world_size},
                   "code": code_version(), **fastpath.describe(cfg, device)}

    data = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
    model = build_model(cfg, data.info)
    init_source, init_note = resolve_init(model, cfg)
    if init_note and not quiet:
        tqdm.write(f"{run_path}: {init_note}")
    pretrain_record = results.read_record(Path(init_source)) if init_source and \
        Path(init_source).is_dir() else None
    model.to(device)
    fastpath.prepare_model(model, cfg, device)
    optimizers = method.make_optimizers(model)
    loader = parallel.shard(train_loader(cfg, data, device))  # this rank's slice of each batch
    steps_per_epoch = method.optimizer_steps_per_epoch(len(loader))
    schedule = make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs,
                             **cfg.schedule_args)
    # evaluation images move to the device once, not batch by batch every epoch
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    test_idx = fixed_subset(len(test_y), cfg.monitor_n)
    train_idx = fixed_subset(len(data.train_y), cfg.monitor_n)  # streamed: all of them
    monitor = MonitorSets(test_x, test_y, test_x[test_idx], test_y[test_idx],
                          data.train_x[train_idx].to(device), data.train_y[train_idx].to(device))

    # nothing above wrote to this run's folder (a pre-training it needs is a run of its own):
    # bad input has failed by now with the store untouched
    if world.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReproError(f"cannot create {directory}: {e.strerror}") from None
        locks.enter_context(results.run_lock(directory))
        record = results.read_record(directory)
    finished_meanwhile = bool(record and record.get("status") == results.STATUS_DONE)
    if parallel.from_main(finished_meanwhile):  # finished by another process while we set up
        return record if world.is_main else {"rank": world.rank, "status": results.STATUS_DONE}
    if world.is_main:
        results.remove_stale_temps(directory)
        results.atomic_write_json(directory / "config.json",
                                  {**cfg.to_dict(), "config_hash": cfg.config_hash()})
    parallel.barrier()  # rank 0's checkpoint (if any) is whole before every rank reads it
    state = {"epoch": 0, "global_step": 0, "train_time_s": 0.0, "flops_per_epoch": None,
             "metrics": [], "lr_log": []}
    checkpoint = _load_checkpoint(checkpoint_path, cfg)
    if checkpoint is not None:
        state = _restore(checkpoint, model, optimizers, method, device)
    parallel.broadcast_model(model)
    if world.is_main:
        results.write_record(directory, {**base_record, "status": results.STATUS_RUNNING,
                                         "epochs_done": state["epoch"]})

    total_steps = cfg.epochs * len(loader)
    bar = tqdm(total=total_steps, initial=state["epoch"] * len(loader), unit="batch",
               desc=run_path, disable=quiet or not sys.stderr.isatty(), leave=False)
    ctx = Context(model=model, optimizers=optimizers, schedule=schedule,
                  loader=_Progress(loader, bar), cfg=cfg, device=device, epoch=state["epoch"],
                  steps_per_epoch=steps_per_epoch, global_step=state["global_step"],
                  lr_log=state["lr_log"],
                  average_gradients=parallel.average_gradients if parallel.active else None,
                  gather=parallel.gather)
    for epoch in range(state["epoch"], cfg.epochs):
        if ctx.done or state.get("stop_reason"):
            break
        ctx.epoch = epoch
        seed_epoch(cfg, epoch, world.rank)
        loader.set_epoch(epoch)
        lr_start = ctx.current_lr()
        t0 = time.perf_counter()
        with fastpath.autocast(cfg, device):  # bf16 on the GPU; evaluation stays fp32
            if state["flops_per_epoch"] is None:  # count one epoch on the real code path
                with TotalFlopCounter() as counter, fastpath.eager(cfg):
                    stats = method.train_epoch(ctx)
                state["flops_per_epoch"] = parallel.total(int(counter.get_total_flops()))
            else:
                stats = method.train_epoch(ctx)
        fastpath.synchronize(device)
        state["train_time_s"] += time.perf_counter() - t0
        stats = parallel.mean(stats)
        if not all(torch.isfinite(torch.tensor(v)) for v in stats.values()):
            if world.is_main:
                _fail(directory, base_record, epoch, f"non-finite training metrics {stats}")
            raise TrainingDiverged(f"{run_path}: training diverged at epoch {epoch + 1} "
                                   f"(loss {stats.get('train_loss')}); last good checkpoint kept")
        ctx.stop_reason = parallel.end_epoch(model, ctx.stop_reason)
        state.update(epoch=epoch + 1, global_step=ctx.global_step,
                     stop_reason=ctx.stop_reason)
        if not world.is_main:  # rank 0 monitors and writes; the others train on
            continue
        row = {"epoch": epoch + 1, "lr": lr_start, "step": ctx.global_step, **stats,
               **_monitor(model, monitor, cfg, device),
               "train_time_s": round(state["train_time_s"], 3)}
        state["metrics"].append(row)
        _save_checkpoint(checkpoint_path, cfg, model, optimizers, method, state)
        results.write_metrics(directory / "metrics.csv", state["metrics"])
        results.write_metrics(directory / "lr.csv",
                              [{"step": i, "lr": lr} for i, lr in enumerate(state["lr_log"])])
        if not quiet:
            tqdm.write(_epoch_line(run_path, row, cfg.epochs))
    bar.close()
    if not world.is_main:  # back once rank 0 has written the checkpoint and the record
        parallel.barrier()
        return {"rank": world.rank, "status": results.STATUS_DONE, "epochs_done": state["epoch"],
                "steps_done": state["global_step"]}

    t_eval = time.perf_counter()
    final = final_evaluation(model, test_x, test_y, cfg, device)
    faults.point("eval")  # test-only (faults.py): no-op unless REPRO_FAULT names it
    epochs_done = state["epoch"]
    record = {
        **base_record, **final,
        "status": results.STATUS_DONE,
        "epochs_done": epochs_done, "steps_done": state["global_step"],
        "steps_per_epoch": steps_per_epoch, "stopped_early": state.get("stop_reason"),
        "train_time_s": round(state["train_time_s"], 3),
        "train_minutes": round(state["train_time_s"] / 60, 3),
        "eval_time_s": round(time.perf_counter() - t_eval, 3),
        "train_flops": (state["flops_per_epoch"] or 0) * epochs_done,
        "flops_note": "FLOPs counted with torch.utils.flop_counter over epoch 1, times epochs",
        "pretrain_source": init_source, "init_note": init_note or None,
        "pretrain_minutes": (pretrain_record or {}).get("train_minutes"),
        "pretrain_flops": (pretrain_record or {}).get("train_flops"),
        "train_images": data.num_train,
        "eps": cfg.eps, "train_eps": cfg.train_eps if cfg.train_eps is not None else cfg.eps,
        "eval_alpha": cfg.eval_alpha_value,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results.write_record(directory, record)  # the last write: "done" means all is on disk
    parallel.barrier()
    return record


def final_evaluation(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor,
                     cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The table protocol (evaluation.py) with the run's evaluation settings."""
    return evaluate(model, test_x, test_y, eps=cfg.eps, alpha=cfg.eval_alpha_value,
                    steps=cfg.eval_steps, n=cfg.eval_n, batch=cfg.eval_batch, device=device,
                    seed=cfg.seed, aa_n=cfg.aa_n, checks=cfg.eval_checks)


def missing_evaluation(cfg: RunConfig, record: dict[str, Any]) -> bool:
    """Does the config ask a done run for an evaluation its record lacks (checks, AutoAttack,
    or AutoAttack on another number of images)?"""
    if cfg.eval_checks and "checks" not in record:
        return True
    if cfg.aa_n == 0:
        return False
    eval_n = int(record.get("eval_n") or 0)
    wanted = eval_n if cfg.aa_n is None else min(cfg.aa_n, eval_n)
    return (record.get("aa_acc") is None or record.get("aa_n") != wanted
            or record.get("aa_version") != AA_VERSION)


def reevaluate(cfg: RunConfig, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a done run again from its checkpoint.pt, training nothing, and update its record
    (atomically). Only record.json and config.json's evaluation fields change; clean and PGD
    numbers that come out different (a non-deterministic device) keep their old values in
    `previous_eval`."""
    if not (directory / "checkpoint.pt").is_file():
        raise CheckpointError(f"{directory} is done but its record lacks the evaluation asked "
                              "for (AutoAttack on aa_n images, checks) and it has no "
                              "checkpoint.pt to evaluate: copy the checkpoint back, or set "
                              "aa_n=0 and eval_checks=false to take the record as it is")
    device = resolve_device(cfg.device)
    test_x, test_y = load_test_set(cfg)
    model = build_model(cfg, dataset_info(cfg.dataset))
    load_weights(model, directory / "checkpoint.pt")
    model.to(device)
    t_eval = time.perf_counter()
    final = final_evaluation(model, test_x.to(device), test_y.to(device), cfg, device)
    previous = {k: record[k] for k in ("clean_acc", "pgd_acc") if record.get(k) != final[k]}
    updated = {**record, **final, "eval_time_s": round(time.perf_counter() - t_eval, 3),
               "reevaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "reevaluated_code": code_version(), "reevaluated_hardware": hardware()}
    if previous:
        updated["previous_eval"] = previous
    config = results.read_json(directory / "config.json") or {}
    results.atomic_write_json(directory / "config.json",
                              {**config, **{k: getattr(cfg, k) for k in EVALUATION_FIELDS}})
    results.write_record(directory, updated)
    return updated


@dataclass
class MonitorSets:
    """The per-epoch evaluation images, already on the device (uint8)."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    test_subset_x: torch.Tensor
    test_subset_y: torch.Tensor
    train_subset_x: torch.Tensor
    train_subset_y: torch.Tensor


def _monitor(model: nn.Module, sets: MonitorSets, cfg: RunConfig,
             device: torch.device) -> dict[str, float]:
    """Per-epoch curves (Fig 1, Fig 4): clean test accuracy on the whole test set, PGD on fixed
    test and train subsets."""
    out = {"test_clean_acc": clean_accuracy(model, sets.test_x, sets.test_y,
                                            batch=cfg.eval_batch, device=device)}
    if cfg.monitor_n > 0 and cfg.monitor_steps > 0:
        kwargs = dict(eps=cfg.eps, alpha=cfg.eval_alpha_value, steps=cfg.monitor_steps,
                      batch=cfg.eval_batch, device=device)
        out["test_pgd_acc"] = pgd_accuracy(model, sets.test_subset_x, sets.test_subset_y,
                                           **kwargs)
        out["train_pgd_acc"] = pgd_accuracy(model, sets.train_subset_x, sets.train_subset_y,
                                            **kwargs)
    return out


def _epoch_line(run_path: str, row: dict[str, Any], epochs: int) -> str:
    parts = [f"{run_path} epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.3g}",
             f"loss {row['train_loss']:.3f}", f"test clean {row['test_clean_acc']:.2f}"]
    if "test_pgd_acc" in row:
        parts.append(f"test PGD {row['test_pgd_acc']:.2f} train PGD {row['train_pgd_acc']:.2f}")
    parts.append(f"{row['train_time_s']:.0f}s")
    return " | ".join(parts)


def _save_checkpoint(path: Path, cfg: RunConfig, model: nn.Module,
                     optimizers: list[torch.optim.Optimizer], method: Method,
                     state: dict[str, Any]) -> None:
    results.atomic_torch_save({
        "config_hash": cfg.config_hash(),
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "method": method.state_dict(),
        "epoch": state["epoch"], "global_step": state["global_step"],
        "train_time_s": state["train_time_s"], "flops_per_epoch": state["flops_per_epoch"],
        "metrics": state["metrics"], "lr_log": state["lr_log"],
        "stop_reason": state.get("stop_reason"),
    }, path)


def _load_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The newest whole checkpoint of the run: checkpoint.pt, or if that one is torn the
    previous good one (checkpoint.prev.pt, with a warning); None when there is neither."""
    torn: list[str] = []
    for candidate in (path, results.previous_checkpoint(path)):
        if not candidate.is_file():
            continue
        why = results.check_checkpoint(candidate)
        ckpt: Any = None
        if why is None:
            try:
                ckpt = safe_load(candidate)
            except CheckpointError as e:
                why = str(e)
        if why is None and not (isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt):
            why = "not a checkpoint of this suite"
        if why is not None:
            torn.append(f"{candidate.name}: {why}")
            continue
        if ckpt.get("config_hash") != cfg.config_hash():
            raise CheckpointError(f"{candidate}: written by another config (hash "
                                  f"{ckpt.get('config_hash')} != {cfg.config_hash()})")
        if torn:
            print(f"warning: {torn[0]}; resuming from {candidate.name} (epoch {ckpt['epoch']})",
                  file=sys.stderr)
        return ckpt
    if torn:
        raise CheckpointError(f"no usable checkpoint in {path.parent} ({'; '.join(torn)}); "
                              "remove them to start the run over")
    return None


def _restore(ckpt: dict[str, Any], model: nn.Module, optimizers: list[torch.optim.Optimizer],
             method: Method, device: torch.device) -> dict[str, Any]:
    model.load_state_dict(ckpt["model"])
    for opt, opt_state in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(opt_state)
    method.load_state_dict(_to_device(ckpt["method"], device))
    restored = {k: ckpt[k] for k in ("epoch", "global_step", "train_time_s",
                                     "flops_per_epoch", "metrics", "lr_log")}
    restored["stop_reason"] = ckpt.get("stop_reason")
    return restored


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def _fail(directory: Path, base_record: dict[str, Any], epoch: int, reason: str) -> None:
    results.write_record(directory, {**base_record, "status": results.STATUS_FAILED,
                                     "failed_epoch": epoch + 1, "reason": reason})


def _check_writable(directory: Path) -> None:
    """Fail early, creating nothing, if the run's folder could not be created or written."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ReproError(f"cannot create {directory}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReproError(f"results folder {existing} is not writable")


def _was_started(cfg: RunConfig, directory: Path) -> bool:
    """Whether `--resume` has something to continue: this run's folder (its config, written
    before the first epoch, or a checkpoint) or a prerequisite run it trains first."""
    checkpoint = directory / "checkpoint.pt"
    if any(p.is_file() for p in (directory / "config.json", checkpoint,
                                 results.previous_checkpoint(checkpoint))):
        return True
    before = []
    if cfg.pretrain is not None and not cfg.init:
        before.append(pretrain_config(cfg))
    if cfg.extra_data == "pseudo-label":
        before.append(teacher_config(cfg))
    return any(_was_started(c, results.run_dir(c.results_dir,
                                               results.pretrain_path(c.scale, c.config_hash())))
               for c in before)
