"""Run experiment sweeps as SLURM job arrays through submitit, and say where each run stands.

    submit_sweep(configs, options) -> job ids     one array per sweep (plus one per dependency)
    status(configs) -> rows        done / running / queued / failed / interrupted / not submitted
    ExecutorOptions                               what to ask SLURM for (partition, GPUs, time...)
    options_from_args                            the CLI's --slurm flags (cli/parser.py SLURM_FLAGS) read

Why it is shaped this way (DESIGN §10):
- The store is the source of truth. A run whose record is done is never submitted again, and a
  job only calls `paper_repro.training.runner.train_run(cfg)`, which resumes from the run's last epoch
  checkpoint. So a job that is preempted, timed out or requeued by an admin loses at most one
  epoch, and re-submitting a sweep is always safe.
- What the store cannot know (is a job for this run already queued?) is kept in a small ledger
  per run, `<run_dir>/slurm.json` (job id, log paths), and checked against the scheduler itself
  (squeue for live jobs, sacct for finished ones) rather than trusted.
- A run that needs another run first (AFT needs its natural pre-training, self-training
  pre-training needs its teacher) gets that run as its own job, once per config hash however
  many rows share it, and waits for it with `--dependency=afterok`. The graph is the one the
  local path walks (paper_repro/training/pipeline.py); the runner never trains a prerequisite itself.
- One module (over 400 lines) because submission, the ledger and status read the same
  scheduler state; split, each part would need the others' private helpers.
- submitit is imported only when a job is built or submitted: the CLI imports this module (by
  name, cli/parser.py SLURM_LAUNCHER) only for `--slurm` and `status`, and training must not depend on
  submitit.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from paper_repro import results
from paper_repro.cli.parser import SLURM_FLAGS
from paper_repro.errors import ReproError

if TYPE_CHECKING:
    from paper_repro.config import RunConfig
    from paper_repro.training.pipeline import PlannedRun

LEDGER = results.LEDGER
START_HINT = 'eval "$(sudo slurm/cluster/start.sh)"'

# scheduler state -> what status() calls it (anything else that is not listed is final)
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "PREEMPTED",
           "SUSPENDED"}
_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}


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
            run (paper_repro.runtime.distributed); rank 0 checkpoints, and after a requeue every rank
            resumes from rank 0's checkpoint."""
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


# --- planning: which runs, in which order ---------------------------------------------------------

def _absolute(cfg: RunConfig) -> RunConfig:
    """Jobs may start in another directory: pin the store to an absolute path (results_dir is
    an execution field, so the config hash does not change)."""
    return dataclasses.replace(cfg, results_dir=str(Path(cfg.results_dir).resolve()))


def _plan(configs: Sequence[RunConfig]) -> dict[Path, PlannedRun]:
    """Every run of the sweep and, first, every run it needs: the one graph of
    paper_repro/training/pipeline.py, which the local path trains in the same order."""
    from paper_repro.training.pipeline import plan

    return plan([_absolute(cfg) for cfg in configs])


# --- the scheduler's view ---------------------------------------------------------------------

def _read_ledger(directory: Path) -> dict[str, Any] | None:
    return results.read_json(directory / LEDGER)


def _run_quiet(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _slurm_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(STATE, reason) per job id ("123" or "123_4"). squeue knows live jobs and why they wait;
    sacct (slurmdbd) knows finished ones. A job neither knows is absent from the result."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    states: dict[str, tuple[str, str]] = {}
    acct = _run_quiet(["sacct", "-o", "JobID,State", "--parsable2",
                       *[a for b in bases for a in ("-j", b)]])
    if acct is not None and acct.returncode == 0:
        for job_id, info in SlurmInfoWatcher().read_info(acct.stdout).items():
            states[job_id] = (info.get("State", "UNKNOWN").split(" ")[0], "")
    queue = _run_quiet(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)])
    if queue is None or (queue.returncode != 0 and "Invalid job id" not in queue.stderr):
        reason = (queue.stderr.strip().splitlines() or ["no answer"])[-1] if queue else "timeout"
        raise ReproError(f"cannot reach the SLURM controller (squeue: {reason}); is the "
                         f"cluster up? (to try one here: {START_HINT})")
    for line in queue.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], "" if parts[2] == "None" else parts[2])
    return states


def _scheduler_view(ledgers: dict[Path, dict[str, Any]]) -> dict[Path, tuple[str, str]]:
    """(STATE, reason) for each run that has a ledger: from SLURM, or for local jobs from the
    process table (their job id is the pid of submitit's controller)."""
    slurm_ids = [led["job_id"] for led in ledgers.values() if led.get("cluster") == "slurm"]
    states = _slurm_states(slurm_ids) if slurm_ids else {}
    out = {}
    for directory, led in ledgers.items():
        job_id = str(led.get("job_id"))
        if led.get("cluster") == "slurm":
            state = states.get(job_id)
            if state is None and time.time() - led.get("submitted_at", 0) < 30:
                state = ("PENDING", "just submitted")  # slurmdbd lags sbatch by a moment
            out[directory] = state or ("UNKNOWN", "")
        elif led.get("cluster") == "local" and job_id.isdigit() and Path(f"/proc/{job_id}").exists():
            out[directory] = ("RUNNING", "")
        elif led.get("cluster") == "local" and not job_id:  # the local pool's own entries
            out[directory] = _pool_state(led)
        else:
            out[directory] = ("UNKNOWN", "")
    return out


def _pool_state(led: dict[str, Any]) -> tuple[str, str]:
    """A run the local pool (paper_repro/orchestration/pool.py) holds but has not started: queued while that
    pool's process lives, blocked when a run it needs failed; STALE once the pool is gone."""
    if led.get("state") == "blocked":
        return ("BLOCKED", f"needs {led.get('blocked_by')}, which failed")
    pid = str(led.get("pool_pid", ""))
    if led.get("state") == "queued" and pid.isdigit() and Path(f"/proc/{pid}").exists():
        return ("PENDING", f"waiting in the local pool (pid {pid})")
    return ("STALE", "")


def _is_active(state: str) -> bool:
    return state in _QUEUED or state in _RUNNING


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
        previous = _read_ledger(run.directory)
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
    runs = _plan(configs)
    if not runs:
        return []
    first = _absolute(configs[0])
    folder = Path(options.folder or Path(first.results_dir) / "slurm").resolve()
    name = f"{first.experiment}-{first.scale}"

    ledgers = {d: led for d in runs if not results.is_done(d) and (led := _read_ledger(d))}
    view = _scheduler_view(ledgers)
    job_of: dict[Path, str] = {d: ledgers[d]["job_id"] for d, (state, _r) in view.items()
                               if _is_active(state)}
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


# --- status -----------------------------------------------------------------------------------

def _last_error(log: str | None) -> str:
    """The line of a job's stderr that says what went wrong: the last Python exception line,
    else the last non-empty line."""
    if not log or not Path(log).is_file():
        return ""
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Diverged)\b.*", line):
            return line[:300]
    return lines[-1][:300] if lines else ""


def status(configs: Sequence[RunConfig]) -> list[dict[str, Any]]:
    """Where each run of `configs` (and each run they need first) stands, from the store and
    the scheduler or the local pool: one dict per run with run, state (done, running, queued,
    failed, blocked, interrupted or not submitted), job_id, log (the job's stderr) and detail (metrics, wait reason, or the last
    error line of the log)."""
    runs = _plan(configs)
    ledgers = {d: led for d in runs if (led := _read_ledger(d))}
    view = _scheduler_view({d: led for d, led in ledgers.items() if not results.is_done(d)})
    rows = []
    for directory, run in runs.items():
        record = results.read_record(directory) or {}
        led = ledgers.get(directory) or {}
        row = {"run": run.run_path, "state": "not submitted", "job_id": led.get("job_id", ""),
               "log": led.get("stderr", ""), "detail": ""}
        state, reason = view.get(directory, ("", ""))
        if state == "STALE":  # a pool that ended or was killed before starting the run
            led, row["job_id"], row["log"] = {}, "", ""
        if record.get("status") == results.STATUS_DONE:
            row["state"] = "done"
            row["detail"] = (f"clean {record.get('clean_acc', math.nan):.2f}% "
                             f"PGD {record.get('pgd_acc', math.nan):.2f}%")
        elif led and state in _QUEUED:
            row["state"] = "queued"
            row["detail"] = reason or state
        elif led and state == "BLOCKED":
            row["state"] = "blocked"
            row["detail"] = reason
        elif led and state in _RUNNING:
            row["state"] = "running"
            row["detail"] = f"epoch {record.get('epochs_done', 0)}/{run.cfg.epochs} done"
        elif led:
            row["state"] = "failed"
            error = _last_error(led.get("stderr"))
            row["detail"] = f"{state}: {error}" if error else (
                f"job {state}" if state != "UNKNOWN" else "the scheduler no longer knows the job")
        elif record.get("status") == results.STATUS_FAILED:
            row["state"] = "failed"
            row["detail"] = str(record.get("reason", ""))
        elif record.get("status") == results.STATUS_RUNNING:  # trained here, not by SLURM
            training = results.is_locked(directory)  # a live process holds the run's lock
            row["state"] = "running" if training else "interrupted"
            row["detail"] = (f"epoch {record.get('epochs_done', 0)}/{run.cfg.epochs} done" +
                             ("" if training else "; rerun (--resume) to continue"))
        rows.append(row)
    return rows


def format_status(rows: Sequence[dict[str, Any]]) -> str:
    """The status rows as a plain-text table, then the log path of every failed run."""
    from tabulate import tabulate

    table = tabulate([[r["run"], r["state"], r["job_id"], r["detail"]] for r in rows],
                     headers=["run", "state", "job", "detail"], tablefmt="plain")
    failed = [f"  {r['run']}: {r['log']}" for r in rows if r["state"] == "failed" and r["log"]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return "\n".join([table, "", summary] + (["logs of failed runs:"] + failed if failed else []))


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
