"""The local pool: the graph of runs (pipeline.py) walked on this machine with K slots.

    train_all(configs, slots)  every run of the configs and everything they need, K at a time
    Slots.resolve(jobs, gpus)  K from --jobs / --gpus (default: one per GPU, else one per core)

The same graph the SLURM launcher submits as job arrays chained with afterok, run here: a run
starts only when every run it needs is done (AFT's natural pre-training, a self-training
teacher), never more than K at once, and a run whose prerequisite failed is not started but
reported as blocked while the others go on.

Why submitit's LocalExecutor rather than a hand-written process manager: it already starts a
job as its own process with CUDA_VISIBLE_DEVICES set to the GPUs it is given (`visible_gpus`),
writes its stdout/stderr where the SLURM path writes them (<store>/slurm/<job id>/), returns the
result or the child's traceback, runs N tasks per job for data-parallel runs (the runner's
distributed.py reads submitit's environment), and requeues a Checkpointable job on timeout.
What it lacks, the order and the slot count, is this file. One executor per job, holding that
slot's GPUs; its `timeout_min` default of 2 minutes is raised to a week.

On a CPU every run trains with one thread, in the pool and one at a time alike (`--jobs 1`
trains in this process), so a pool's records equal a sequential run's on the same machine.
Ctrl-C (or SIGTERM) stops every child; each run has its last finished epoch checkpointed, and
the next call resumes them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..store import files, layout
from ..training import pipeline
from ..config import RunConfig
from ..errors import ReproError

WEEK_MIN = 7 * 24 * 60
JOBS_ENV = "REPRO_JOBS"  # the default K where --jobs is not given (the tests set 1)
POLL_S = 0.2


@dataclass(frozen=True)
class Slots:
    """What the pool may use: K runs at once; with GPUs, the GPU ids and how many a run takes."""

    jobs: int
    gpus: tuple[int, ...] = ()
    gpus_per_run: int = 1

    @property
    def threads_per_run(self) -> int:
        """One thread per run on a CPU (records comparable across K); with GPUs the cores are
        shared out (the data loading and the host side of the step)."""
        return max(1, (os.cpu_count() or 1) // self.jobs) if self.gpus else 1

    @classmethod
    def resolve(cls, jobs: int | None = None, gpus: str | None = None,
                gpus_per_run: int = 1) -> Slots:
        """--jobs K, --gpus all|0,1,3 and --gpus-per-run N as slots. Default K: one per listed
        GPU group, else $REPRO_JOBS, else one per visible GPU, else one per CPU core (measured
        fastest on a 2-core machine: README, "Local pool")."""
        if gpus_per_run < 1:
            raise ReproError("--gpus-per-run must be >= 1")
        ids = parse_gpus(gpus) if gpus else ()
        if not ids and gpus_per_run > 1:
            ids = parse_gpus("all")
        if ids and len(ids) < gpus_per_run:
            raise ReproError(f"--gpus-per-run {gpus_per_run} but only {len(ids)} GPU(s) listed")
        if jobs is not None and jobs < 1:
            raise ReproError("--jobs must be >= 1")
        if jobs is None and ids:
            jobs = len(ids) // gpus_per_run
        elif jobs is None:
            jobs = int(os.environ[JOBS_ENV]) if os.environ.get(JOBS_ENV) else default_jobs()
        if ids and jobs > len(ids) // gpus_per_run:
            raise ReproError(f"--jobs {jobs} needs {jobs * gpus_per_run} GPUs; "
                             f"--gpus lists {len(ids)}")
        return cls(max(1, jobs), ids, gpus_per_run)

    def describe(self) -> str:
        if self.gpus:
            return (f"{self.jobs} at a time, {self.gpus_per_run} GPU(s) each from "
                    f"{','.join(map(str, self.gpus))}")
        return f"{self.jobs} at a time, one CPU thread each"


def default_jobs() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def parse_gpus(text: str) -> tuple[int, ...]:
    """'all' or '0,1,3' as GPU ids, each checked against the GPUs this machine has."""
    import torch

    count = torch.cuda.device_count()
    if text.strip() == "all":
        if not count:
            raise ReproError("--gpus all: no GPU found on this machine")
        return tuple(range(count))
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ReproError(f"--gpus expects 'all' or GPU ids like 0,1,3, got '{text}'") from None
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise ReproError(f"--gpus: ids must be distinct and >= 0, got '{text}'")
    missing = [i for i in ids if i >= count]
    if missing:
        raise ReproError(f"--gpus: this machine has {count} GPU(s); no GPU {missing[0]}")
    return ids


@dataclass
class Outcome:
    """What a pool call did: records of runs done, one line per failed or blocked run."""

    records: dict[Path, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)    # run path -> last error line
    blocked: dict[str, str] = field(default_factory=dict)   # run path -> the failed run it needs

    def raise_if_failed(self) -> None:
        if self.failed or self.blocked:
            first = next(iter(self.failed.items()), None)
            raise ReproError(f"{len(self.failed)} run(s) failed and {len(self.blocked)} were "
                             "blocked by them" + (f" ({first[0]}: {first[1]})" if first else "")
                             + "; the others are done (`status` shows each run's log), and "
                             "rerunning resumes")


# --- the job ----------------------------------------------------------------------------------


def train_one(cfg: RunConfig, run_path: str, threads: int) -> dict[str, Any]:
    """One run in a pool child: its threads pinned, trained by the one-run verb."""
    import torch

    from ..runtime.distributed import shutdown
    from ..training.runner import train_run

    torch.set_num_threads(threads)
    try:
        return train_run(cfg, run_path=run_path, quiet=True)
    finally:
        shutdown()


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the walk -----------------------------------------------------------------------------------


def train_all(configs: Sequence[RunConfig], slots: Slots, *,
              say: Callable[[str], None] = print) -> Outcome:
    """Train every run of `configs` and every run they need, at most `slots.jobs` at once, each
    after all it needs. Done runs are reused. With one slot (or one run to train), and no GPUs
    listed, the runs train in this process, one after another, with the pool's threads per
    run."""
    from ..robustness.evaluation import missing_evaluation
    from ..training.runner import check_existing

    graph = pipeline.plan(list(configs))
    for directory, run in graph.items():  # another config's run in a folder: one line, now
        check_existing(directory, run.cfg)
    records = {d: layout.read_record(d) for d in graph}
    # a done run is reused, unless the config asks it for an evaluation its record lacks
    # (AutoAttack on more images, the checks): then the runner re-evaluates its checkpoint
    todo = {d: r for d, r in graph.items() if not (
        records[d] and records[d].get("status") == layout.STATUS_DONE
        and not missing_evaluation(r.cfg, records[d]))}
    outcome = Outcome(records={d: records[d] for d in graph if d not in todo})
    if not todo:
        return outcome
    if not slots.gpus and (slots.jobs == 1 or len(todo) == 1):  # listed GPUs: always a job
        with _threads(slots.threads_per_run):
            return _in_process(configs, outcome, say)
    return _Pool(todo, slots, outcome, say).run()


def _in_process(configs: Sequence[RunConfig], outcome: Outcome,
                say: Callable[[str], None]) -> Outcome:
    """One slot: each config through `local.train_with_prerequisites` (the public in-process
    walker), here; a run whose prerequisite failed is reported blocked, the others go on."""
    from . import local

    failed: set[Path] = set()
    for cfg in configs:
        graph = pipeline.plan([cfg])
        target = list(graph)[-1]
        if target in outcome.records:
            continue
        culprit = next((d for d in graph if d in failed), None)
        if culprit is not None:
            outcome.blocked[cfg.run_path] = layout.run_path_of(culprit)
            say(f"blocked {cfg.run_path}: needs {layout.run_path_of(culprit)}, which failed")
            continue
        try:
            outcome.records[target] = local.train_with_prerequisites(cfg)
        except ReproError as e:
            if len(configs) == 1:
                raise
            culprit = next((d for d in graph if not layout.is_done(d)), target)
            failed.add(culprit)
            outcome.failed[layout.run_path_of(culprit)] = " ".join(str(e).split())
            say(f"failed {layout.run_path_of(culprit)}: {' '.join(str(e).split())}")
            if culprit != target:
                outcome.blocked[cfg.run_path] = layout.run_path_of(culprit)
    return outcome


class _Pool:
    """K submitit local jobs at a time, ready runs in `critical_first` order."""

    def __init__(self, todo: dict[Path, pipeline.PlannedRun], slots: Slots, outcome: Outcome,
                 say: Callable[[str], None]) -> None:
        self.todo, self.slots, self.outcome, self.say = todo, slots, outcome, say
        self.waiting = critical_first(todo)
        self.running: dict[Path, tuple[Any, tuple[int, ...]]] = {}  # dir -> (job, its GPUs)
        self.free_gpus = list(slots.gpus)
        first = next(iter(todo.values())).cfg
        self.folder = (Path(first.results_dir) / "slurm").resolve()

    def run(self) -> Outcome:
        for run in self.waiting:  # `status` shows them queued while this process lives
            _write_ledger(run.directory, {"cluster": "local", "job_id": "", "pool_pid": os.getpid(),
                                          "run_path": run.run_path, "state": "queued"})
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            while self.waiting or self.running:
                self._start_ready()
                self._collect_finished()
                if self.running:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            self._stop_all()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            for run in self.waiting:  # never started: no pool holds them any more
                _write_ledger(run.directory, None)
            with contextlib.suppress(OSError):  # submitit makes the folder pattern itself, empty
                (self.folder / "%j").rmdir()
        return self.outcome

    def _ready(self, run: pipeline.PlannedRun) -> bool | None:
        """True when every run it needs is done; None when one of them failed or is blocked."""
        for need in run.needs:
            path = layout.run_path_of(need)
            if path in self.outcome.failed or path in self.outcome.blocked:
                return None
            if need in self.todo and need not in self.outcome.records:
                return False
        return True

    def _start_ready(self) -> None:
        for run in list(self.waiting):
            ready = self._ready(run)
            if ready is None:
                need = next(layout.run_path_of(n) for n in run.needs
                            if layout.run_path_of(n) in self.outcome.failed
                            or layout.run_path_of(n) in self.outcome.blocked)
                self.outcome.blocked[run.run_path] = need
                self.waiting.remove(run)
                _write_ledger(run.directory, {"cluster": "local", "job_id": "",
                                              "run_path": run.run_path, "state": "blocked",
                                              "blocked_by": need})
                self.say(f"blocked {run.run_path}: needs {need}, which failed")
            elif ready and len(self.running) < self.slots.jobs:
                self._start(run)
                self.waiting.remove(run)

    def _start(self, run: pipeline.PlannedRun) -> None:
        import submitit

        gpus = tuple(self.free_gpus[:self.slots.gpus_per_run]) if self.slots.gpus else ()
        self.free_gpus = self.free_gpus[len(gpus):]
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        tasks = self.slots.gpus_per_run if gpus else 1
        executor.update_parameters(timeout_min=WEEK_MIN, visible_gpus=gpus,
                                   gpus_per_node=len(gpus), tasks_per_node=tasks)
        job = executor.submit(train_one, run.cfg, run.run_path, self.slots.threads_per_run)
        self.running[run.directory] = (job, gpus)
        _write_ledger(run.directory, {
            "cluster": "local", "job_id": str(job.job_id), "run_path": run.run_path,
            "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
            "folder": str(job.paths.folder), "gpus": list(gpus), "submitted_at": time.time(),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.say(f"started {run.run_path}" + (f" on GPU {','.join(map(str, gpus))}" if gpus
                                              else "") + f" (log: {job.paths.stdout})")

    def _collect_finished(self) -> None:
        for directory, (job, gpus) in list(self.running.items()):
            if not job.done():
                continue
            del self.running[directory]
            self.free_gpus = sorted(self.free_gpus + list(gpus))
            run = self.todo[directory]
            try:
                record = job.result()
                self.outcome.records[directory] = record
                self.say(_done_line(run.run_path, record))
            except Exception as e:  # noqa: BLE001 - the child's error, kept in its log
                self.outcome.failed[run.run_path] = _last_line(e)
                self.say(f"failed {run.run_path}: {self.outcome.failed[run.run_path]} "
                         f"(log: {job.paths.stderr})")

    def _stop_all(self) -> None:
        """Ctrl-C: SIGINT to every job (submitit's controller passes it on, then kills), and
        wait until no child is left."""
        print(f"stopping {len(self.running)} running run(s)...", file=sys.stderr)
        for job, _gpus in self.running.values():
            job.cancel()
        deadline = time.time() + 30
        for job, _gpus in self.running.values():
            process = getattr(job, "_process", None)
            if process is None:
                continue
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except Exception:  # noqa: BLE001 - still alive after 30 s: it goes now
                process.kill()
                process.wait()
        for directory in self.running:  # stopped, not failed: `status` says interrupted
            (directory / layout.LEDGER).unlink(missing_ok=True)


def critical_first(todo: dict[Path, pipeline.PlannedRun]) -> list[pipeline.PlannedRun]:
    """The runs in the order slots go to ready ones: the longest chain of runs waiting on a run
    first (a pre-training that a fine-tune and a student pre-training wait for starts before
    independent rows, so the chain does not end the sweep alone), then the graph's order."""
    height: dict[Path, int] = {}
    for directory in reversed(list(todo)):  # the graph lists a run after everything it needs
        dependents = [d for d, run in todo.items() if directory in run.needs]
        height[directory] = 1 + max((height[d] for d in dependents), default=0)
    order = {d: i for i, d in enumerate(todo)}
    return sorted(todo.values(), key=lambda run: (-height[run.directory], order[run.directory]))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _write_ledger(directory: Path, ledger: dict[str, Any] | None) -> None:
    """The run's ledger (the SLURM path's file), which `status` reads; None removes a pool's
    queued/blocked entry once no pool holds the run, and leaves a started job's alone."""
    path = directory / layout.LEDGER
    if ledger is None:
        old = layout.read_json(path)
        if old and old.get("cluster") == "local" and not old.get("job_id"):
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a folder the pool made only for the entry
                directory.rmdir()
        return
    directory.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(path, ledger)


def _last_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _done_line(run_path: str, record: dict[str, Any]) -> str:
    aa = f" AA {record['aa_acc']:.2f}%" if record.get("aa_acc") is not None else ""
    return (f"done {run_path}: clean {record.get('clean_acc', float('nan')):.2f}% "
            f"PGD {record.get('pgd_acc', float('nan')):.2f}%{aa}")
