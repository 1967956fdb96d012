"""Run experiment sweeps as SLURM job arrays through submitit, and say where each run stands.

    submit_sweep(configs, options) -> job ids     one array per sweep (plus one per dependency)
    status(configs) -> rows        done / running / queued / failed / interrupted / not submitted
    ExecutorOptions                               what to ask SLURM for (partition, GPUs, time...)
    options_from_args(args)                       the --slurm flags (cli/parser.py SLURM_FLAGS)

Why it is shaped this way (DESIGN §10):
- The store is the source of truth. A run whose record is done is never submitted again, and a
  job only calls `paper_repro.training.runner.train_run(cfg)`, which resumes from the run's last
  epoch checkpoint. So a job that is preempted, timed out or requeued by an admin loses at most one
  epoch, and re-submitting a sweep is always safe.
- What the store cannot know (is a job for this run already queued?) is kept in a small ledger
  per run, `<run_dir>/slurm.json` (job id, log paths), and checked against the scheduler itself
  (squeue for live jobs, sacct for finished ones) rather than trusted.
- A run that needs another run first (AFT needs its natural pre-training, self-training
  pre-training needs its teacher) gets that run as its own job, once per config hash however
  many rows share it, and waits for it with `--dependency=afterok`. The graph is the one the
  local path walks (paper_repro/training/pipeline.py); the runner never trains a prerequisite
  itself.
- Where each run stands (store, ledger, scheduler) is status.py's: submission asks it which
  runs are already queued or running, and `status` / `format_status` are re-exported here, the
  one module the CLI reaches the plug-in through.
- submitit is imported only when a job is built or submitted: the CLI imports this module (by
  name, cli/parser.py SLURM_LAUNCHER) only for `--slurm` and `status`, and training must not depend
  on submitit.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from paper_repro import results
from paper_repro.cli.parser import SLURM_FLAGS
from paper_repro.errors import ReproError

from .status import (LEDGER, START_HINT, absolute, format_status, is_active, plan_sweep,
                     read_ledger, scheduler_view, status)

__all__ = ["ExecutorOptions", "format_status", "options_from_args", "status", "submit_sweep"]

if TYPE_CHECKING:
    from paper_repro.config import RunConfig
    from paper_repro.training.pipeline import PlannedRun

@dataclass(frozen=True)
class ExecutorOptions:
    """What every job of a sweep asks the scheduler for. None leaves it to the cluster's default.

    `cluster` is None for submitit's choice (SLURM when `srun` is on PATH, else local
    processes); "local" or "debug" force those executors (tests, laptops).
    """

    partition: str | None = None
    gpus_per_job: int | None = None         # N GPUs: N tasks (one per GPU) training data-parallel
    tasks_per_node: int | None = None       # data-parallel processes per job; default one per GPU
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time: str = "24:00:00"                  # HH:MM:SS, D-HH:MM:SS or minutes
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None    # at most this many tasks of an array at once
    sbatch_args: dict[str, Any] = field(default_factory=dict)  # any other sbatch option
    folder: str | None = None               # submitit's folder; default <results_dir>/slurm
    cluster: str | None = None

    def timeout_min(self) -> int:
        return parse_time(self.time)

    def tasks(self) -> int:
        """Processes per job: --tasks-per-node, else one per GPU, else one (CPU)."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(self.gpus_per_job or 1, 1)


def parse_time(text: str) -> int:
    """Minutes (rounded up) from SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ReproError(f"--time: expected HH:MM:SS (or D-HH:MM:SS), got '{text}'")
    days, a, b, c = match.groups()
    fields = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        hours, minutes, seconds = (fields + [0, 0])[:3]
        seconds += 60 * (minutes + 60 * (hours + 24 * int(days)))
    elif len(fields) == 3:
        seconds = fields[2] + 60 * (fields[1] + 60 * fields[0])
    elif len(fields) == 2:
        seconds = fields[1] + 60 * fields[0]
    else:
        seconds = 60 * fields[0]
    if seconds <= 0:
        raise ReproError(f"--time must be positive, got '{text}'")
    return math.ceil(seconds / 60)


# --- the job -----------------------------------------------------------------------------------

def _make_train_job_class() -> type:
    import submitit

    class TrainJob(submitit.helpers.Checkpointable):
        """One run as one job. Checkpointable: on preemption or timeout submitit requeues this
        same call, and `train` picks the run up from its last epoch checkpoint."""

        def __call__(self, cfg: RunConfig, run_path: str | None = None) -> dict[str, Any]:
            """With N tasks every task runs this: `train` joins them into one data-parallel
            run (paper_repro.runtime.distributed); rank 0 checkpoints, and after a requeue every
            rank resumes from rank 0's checkpoint."""
            import torch

            from paper_repro.runtime.distributed import shutdown
            from paper_repro.training.runner import train_run

            cpus = os.environ.get("SLURM_CPUS_PER_TASK")
            if cpus:  # use what was allocated, not every core of a shared node
                torch.set_num_threads(int(cpus))
            try:
                return train_run(cfg, run_path=run_path)
            finally:
                shutdown()

    TrainJob.__module__ = __name__
    TrainJob.__qualname__ = "TrainJob"
    return TrainJob


def __getattr__(name: str) -> Any:
    """`TrainJob` is built on first use (it subclasses a submitit class, and importing this
    module must not import submitit). Pickles refer to it as `slurm.launcher.TrainJob`, so the
    job unpickles it through here as well."""
    if name == "TrainJob":
        cls = _make_train_job_class()
        globals()["TrainJob"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- submission ---------------------------------------------------------------------------------

def slurm_available() -> bool:
    """What submitit's AutoExecutor looks for: `srun` on PATH."""
    return shutil.which("srun") is not None


def _executor(options: ExecutorOptions, folder: Path, name: str, after: Sequence[str]) -> Any:
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.cluster)
    extra = {k.lstrip("-").replace("-", "_"): v for k, v in options.sbatch_args.items()}
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
    tasks = options.tasks()
    params = dict(name=name, timeout_min=options.timeout_min(), mem_gb=options.mem_gb,
                  cpus_per_task=options.cpus_per_task, gpus_per_node=options.gpus_per_job,
                  tasks_per_node=tasks if tasks > 1 else None,
                  # a rank that fails ends the job, instead of the others waiting on it
                  slurm_srun_args=["--kill-on-bad-exit=1"] if tasks > 1 else None,
                  slurm_partition=options.partition, slurm_account=options.account,
                  slurm_qos=options.qos, slurm_array_parallelism=options.array_parallelism,
                  slurm_additional_parameters=extra or None)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _submit_array(options: ExecutorOptions, folder: Path, name: str, group: list[PlannedRun],
                  after: Sequence[str]) -> list[Any]:
    """One job array (a single job if the group has one run), all waiting for `after`."""
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = _executor(options, folder, name, after)
    job_class = __getattr__("TrainJob")
    conf = os.environ.get("SLURM_CONF")
    try:
        # submitting from inside a job would inherit its SLURM_* variables (submitit #1782);
        # clean_env hides SLURM_CONF too, which a cluster without /etc/slurm needs
        with submitit.helpers.clean_env():
            if conf:
                os.environ["SLURM_CONF"] = conf
            with executor.batch():
                jobs = [executor.submit(job_class(), run.cfg, run.run_path) for run in group]
    except (FailedJobError, FailedSubmissionError) as e:
        lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines()
        raise ReproError(f"SLURM refused the job array: {lines[-1].strip() if lines else e}") \
            from None
    cluster = executor.cluster
    for run, job in zip(group, jobs):
        previous = read_ledger(run.directory)
        history = ([previous["job_id"]] + previous.get("previous", [])) if previous else []
        results.atomic_write_json(run.directory / LEDGER, {
            "job_id": str(job.job_id), "cluster": cluster, "run_path": run.run_path,
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "folder": str(job.paths.folder), "depends_on": list(after),
            "submitted_at": time.time(),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous": history[:10]})
    return jobs


def submit_sweep(configs: Sequence[RunConfig],
                 executor_options: ExecutorOptions | None = None) -> list[str]:
    """Submit every run of `configs` that is neither done nor already queued or running.

    Runs without prerequisites go into one job array; a run that needs another run first
    (AFT's pre-training, a self-training teacher) goes into an array that depends on that run's
    job (afterok), one array per distinct set of such jobs. Returns the new job ids, in
    submission order (empty when there is nothing to do).

    With SLURM this returns as soon as sbatch has accepted the arrays. With the local or debug
    executor there is no scheduler to hold dependent jobs back, so it waits for each wave of
    jobs to finish before submitting the next, and for the last one before returning.
    """
    options = executor_options or ExecutorOptions()
    runs = plan_sweep(configs)
    if not runs:
        return []
    first = absolute(configs[0])
    folder = Path(options.folder or Path(first.results_dir) / "slurm").resolve()
    name = f"{first.experiment}-{first.scale}"

    ledgers = {d: led for d in runs if not results.is_done(d) and (led := read_ledger(d))}
    view = scheduler_view(ledgers)
    job_of: dict[Path, str] = {d: ledgers[d]["job_id"] for d, (state, _r) in view.items()
                               if is_active(state)}
    todo = [r for d, r in runs.items() if not results.is_done(d) and d not in job_of]
    import submitit

    on_slurm = (options.cluster or submitit.AutoExecutor.which()) == "slurm"
    # without a scheduler nothing holds jobs back: run at most `array_parallelism` at a time
    chunk = 10**9 if on_slurm else max(1, options.array_parallelism or 1)
    submitted: list[str] = []
    while todo:
        ready = [r for r in todo if all(results.is_done(n) or n in job_of for n in r.needs)]
        if not ready:  # cannot happen with a tree of prerequisites; guards against a loop
            raise ReproError("circular prerequisites among: "
                             + ", ".join(r.run_path for r in todo))
        groups: dict[tuple[str, ...], list[PlannedRun]] = {}
        for run in ready:
            after = tuple(sorted({job_of[n] for n in run.needs if n in job_of}))
            groups.setdefault(after, []).append(run)
        for after, group in groups.items():
            for start in range(0, len(group), chunk):
                part = group[start:start + chunk]
                jobs = _submit_array(options, folder, name, part, after if on_slurm else ())
                for run, job in zip(part, jobs):
                    job_of[run.directory] = str(job.job_id)
                    submitted.append(str(job.job_id))
                if not on_slurm:  # local/debug: finish these before starting more
                    for job in jobs:
                        try:
                            job.result()
                        except Exception:  # noqa: BLE001 - it is in the run's log and status
                            pass
        todo = [r for r in todo if r not in ready]
    return submitted


# --- CLI wiring ---------------------------------------------------------------------------------

def options_from_args(args: argparse.Namespace) -> ExecutorOptions | None:
    """ExecutorOptions from the parsed flags, or None without --slurm. A SLURM flag without
    --slurm, or --slurm where there is no SLURM, is a user error (ReproError)."""
    given = [flag for flag, dest, *_ in SLURM_FLAGS if getattr(args, dest, None) is not None]
    if getattr(args, "sbatch_arg", None):
        given.append("--sbatch-arg")
    if not getattr(args, "slurm", False):
        if given:
            raise ReproError(f"{given[0]} only applies with --slurm")
        return None
    if not slurm_available():
        raise ReproError(f"--slurm: no SLURM found (srun is not on PATH); to try one on this "
                         f"machine: {START_HINT}")
    extra: dict[str, Any] = {}
    for text in args.sbatch_arg:
        key, sep, value = text.partition("=")
        if not key.strip("- "):
            raise ReproError(f"--sbatch-arg expects KEY=VALUE, got '{text}'")
        extra[key.strip().lstrip("-")] = value if sep else True
    for flag, value, least in (("--gpus-per-job", args.gpus_per_job, 0),
                               ("--tasks-per-node", args.tasks_per_node, 1),
                               ("--cpus-per-task", args.cpus_per_task, 1),
                               ("--array-parallelism", args.array_parallelism, 1)):
        if value is not None and value < least:
            raise ReproError(f"{flag} must be >= {least}")
    if args.mem is not None and args.mem <= 0:
        raise ReproError("--mem must be > 0 (GB)")
    if args.gpus_per_job and args.tasks_per_node and args.tasks_per_node != args.gpus_per_job:
        raise ReproError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-job "
                         f"{args.gpus_per_job}: data-parallel jobs run one task per GPU")
    options = ExecutorOptions(partition=args.partition, gpus_per_job=args.gpus_per_job,
                              tasks_per_node=args.tasks_per_node,
                              cpus_per_task=args.cpus_per_task, mem_gb=args.mem,
                              time=args.time or "24:00:00", account=args.account, qos=args.qos,
                              array_parallelism=args.array_parallelism, sbatch_args=extra)
    options.timeout_min()  # a malformed --time fails here, before anything is submitted
    return options
