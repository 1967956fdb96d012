"""Where each run of a sweep stands, from the results store (the source of truth), the run's
ledger (`<run_dir>/slurm.json`: its job id and log paths, written at submission) and the
scheduler itself (squeue for live jobs, sacct for finished ones; for the local pool, its
process table), never trusting the ledger alone. launcher.py submits only the runs this view
shows neither done nor queued nor running; `status` and `format_status` answer
`python -m paper_repro status`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from paper_repro import results
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


# --- planning: which runs, in which order ---------------------------------------------------------

def absolute(cfg: RunConfig) -> RunConfig:
    """Jobs may start in another directory: pin the store to an absolute path (results_dir is
    an execution field, so the config hash does not change)."""
    return dataclasses.replace(cfg, results_dir=str(Path(cfg.results_dir).resolve()))


def plan_sweep(configs: Sequence[RunConfig]) -> dict[Path, PlannedRun]:
    """Every run of the sweep and, first, every run it needs: the one graph of
    paper_repro/training/pipeline.py, which the local path trains in the same order."""
    from paper_repro.training.pipeline import plan

    return plan([absolute(cfg) for cfg in configs])


# --- the scheduler's view ---------------------------------------------------------------------

def read_ledger(directory: Path) -> dict[str, Any] | None:
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


def scheduler_view(ledgers: dict[Path, dict[str, Any]]) -> dict[Path, tuple[str, str]]:
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
        elif (led.get("cluster") == "local" and job_id.isdigit()
              and Path(f"/proc/{job_id}").exists()):
            out[directory] = ("RUNNING", "")
        elif led.get("cluster") == "local" and not job_id:  # the local pool's own entries
            out[directory] = _pool_state(led)
        else:
            out[directory] = ("UNKNOWN", "")
    return out


def _pool_state(led: dict[str, Any]) -> tuple[str, str]:
    """A run the local pool (paper_repro/orchestration/pool.py) holds but has not started: queued
    while that pool's process lives, blocked when a run it needs failed; STALE once the pool is
    gone."""
    if led.get("state") == "blocked":
        return ("BLOCKED", f"needs {led.get('blocked_by')}, which failed")
    pid = str(led.get("pool_pid", ""))
    if led.get("state") == "queued" and pid.isdigit() and Path(f"/proc/{pid}").exists():
        return ("PENDING", f"waiting in the local pool (pid {pid})")
    return ("STALE", "")


def is_active(state: str) -> bool:
    return state in _QUEUED or state in _RUNNING


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
    failed, blocked, interrupted or not submitted), job_id, log (the job's stderr) and detail
    (metrics, wait reason, or the last error line of the log)."""
    runs = plan_sweep(configs)
    ledgers = {d: led for d in runs if (led := read_ledger(d))}
    view = scheduler_view({d: led for d, led in ledgers.items() if not results.is_done(d)})
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
