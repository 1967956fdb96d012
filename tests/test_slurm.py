"""slurm/launcher.py against a real one-node SLURM: job arrays, afterok pre-training, idempotent
re-submission, failures in `status`, and a requeued job resuming to the uninterrupted result.

No mocks. A session fixture starts the throwaway cluster with slurm/cluster/start.sh (munge,
MariaDB, slurmdbd, slurmctld, slurmd; as root it first installs the Debian packages if they are
missing) and stops it at the end. The cluster's AuthInfo cred_expire=10 keeps a requeued job
ineligible for ~11 s instead of Slurm's default 120 s, so the file runs in a few minutes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from paper_repro import cli, results
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from slurm import launcher

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["slurmctld", "slurmd", "slurmdbd", "slurm-client", "munge", "mariadb-server"]
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "srun", "sacct"]
OPTIONS = launcher.ExecutorOptions(time="00:30:00", cpus_per_task=1, cluster="slurm")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _install_packages() -> str | None:
    """Install the cluster's Debian packages; returns why not, or None when done."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"{' '.join(cmd[:2])} failed: {done.stderr.strip()[-300:]}"
    return None


def _skip(reason: str) -> None:
    """Skip, except where a cluster is required (CI sets REPRO_REQUIRE_SLURM=1)."""
    if os.environ.get("REPRO_REQUIRE_SLURM") == "1":
        pytest.fail(f"REPRO_REQUIRE_SLURM=1 but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster():
    """A running single-node SLURM with accounting; SLURM_CONF set for this process."""
    if any(_which(d) is None for d in DAEMONS):
        why = _install_packages()
        if why is not None or any(_which(d) is None for d in DAEMONS):
            _skip(f"SLURM packages ({' '.join(PACKAGES)}) missing and not installable here "
                  f"({why})")
    if os.geteuid() != 0:
        _skip("slurm/cluster/start.sh starts daemons and must run as root")
    started = subprocess.run([str(ROOT / "slurm/cluster/start.sh")], capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    last = started.stdout.strip().splitlines()[-1]
    assert last.startswith("export SLURM_CONF="), started.stdout
    conf = last.split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if "already running" not in started.stderr:  # leave a cluster someone else started alone
        subprocess.run([str(ROOT / "slurm/cluster/stop.sh"), "--purge"], timeout=120)


def _wait(configs, timeout_s: float, until=("done", "failed")) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = launcher.status(configs)
        if all(r["state"] in until for r in rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail("jobs did not finish in time:\n" + launcher.format_status(rows))
        time.sleep(2)


def _sacct(job_id: str, fields: str, *extra: str) -> list[dict[str, str]]:
    out = subprocess.run(["sacct", "-X", "-P", "-o", fields, "-j", job_id, *extra],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    names = out[0].split("|")
    return [dict(zip(names, line.split("|"))) for line in out[1:]]


def _ledger(directory: Path) -> dict:
    return json.loads((directory / launcher.LEDGER).read_text())


# --- the smoke Table 1 as job arrays ------------------------------------------------------------

def _table1_configs(store: Path):
    exp = load_experiment("table1")
    return [resolve_row(exp, r, "smoke", overrides={"results_dir": str(store)})
            for r in exp.row_ids]


@pytest.fixture(scope="module")
def table1_store(cluster, tmp_path_factory):
    """The smoke Table 1 submitted with `sweep --slurm` and run to the end."""
    store = tmp_path_factory.mktemp("slurm_store")
    argv = ["sweep", "table1", "--scale", "smoke", "--slurm", "--time", "00:30:00",
            "--cpus-per-task", "1", "--results-dir", str(store)]
    assert cli.main(argv) == 0
    rows = _wait(_table1_configs(store), timeout_s=420)
    assert all(r["state"] == "done" for r in rows), launcher.format_status(rows)
    return store


def test_smoke_table1_runs_as_job_arrays_and_renders_from_what_the_jobs_wrote(table1_store):
    from paper_repro.report.tables import write_table

    paths = write_table("table1", "smoke", results_dir=table1_store)
    table = pd.read_csv(paths["csv"])
    assert list(table["row"]) == load_experiment("table1").row_ids
    assert (table["status"] == "done").all()
    assert table["clean_acc"].notna().all() and table["pgd_acc"].notna().all()
    runs = table1_store / "runs" / "smoke" / "table1"
    exp = load_experiment("table1")
    trained = set(table["row"].map(exp.source_row))  # a view row has no job of its own
    assert "pgd_at_es" not in trained and not (runs / "pgd_at_es").exists()
    job_ids = {_ledger(runs / r / "seed0")["job_id"] for r in trained}
    assert len({j.split("_")[0] for j in job_ids}) < len(job_ids)  # rows share an array


def test_aft_rows_waited_for_their_pretraining_job(table1_store):
    runs = table1_store / "runs" / "smoke"
    for row in ("aft", "aft_500k"):
        aft_dir = runs / "table1" / row / "seed0"
        pre_dir = Path(results.read_record(aft_dir)["pretrain_source"])
        assert pre_dir.parent.name == "pretrain" and results.is_done(pre_dir)
        aft, pre = _ledger(aft_dir), _ledger(pre_dir)
        assert aft["depends_on"] == [pre["job_id"]]
        # the dependency is in the job array's sbatch script...
        array_id = aft["job_id"].split("_")[0]
        script = Path(aft["folder"]).parent / array_id / f"{array_id}_submission.sh"
        assert f"#SBATCH --dependency=afterok:{pre['job_id']}" in script.read_text()
        # ...and SLURM honoured it: the AFT job started after its pre-training ended
        end = _sacct(pre["job_id"], "JobID,End")[0]["End"]
        start = _sacct(aft["job_id"], "JobID,Start")[0]["Start"]
        assert start >= end, (row, start, end)
    # AFT(+500K)'s self-training pre-training needs a teacher: the plain AFT pre-training,
    # trained once, by its own job
    pre_500k = Path(results.read_record(runs / "table1" / "aft_500k" / "seed0")["pretrain_source"])
    teacher = Path(results.read_record(runs / "table1" / "aft" / "seed0")["pretrain_source"])
    assert _ledger(pre_500k)["depends_on"] == [_ledger(teacher)["job_id"]]


def test_resubmitting_a_finished_sweep_submits_nothing(table1_store, capsys):
    assert launcher.submit_sweep(_table1_configs(table1_store), OPTIONS) == []
    assert cli.main(["sweep", "table1", "--scale", "smoke", "--slurm",
                     "--results-dir", str(table1_store)]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    assert cli.main(["status", "table1", "--scale", "smoke",
                     "--results-dir", str(table1_store)]) == 0
    assert "11 done" in capsys.readouterr().out  # 9 rows + 2 pre-training runs


# --- failures -----------------------------------------------------------------------------------

def test_a_failed_job_shows_as_failed_with_its_log(cluster, tmp_path):
    cfg = tiny_config(tmp_path, dataset="cifar10", data_root=str(tmp_path / "no-such-data"))
    (job_id,) = launcher.submit_sweep([cfg], OPTIONS)
    assert launcher.submit_sweep([cfg], OPTIONS) == []  # queued or running: not submitted twice
    (row,) = _wait([cfg], timeout_s=120)
    assert row["state"] == "failed" and row["job_id"] == job_id
    assert Path(row["log"]).is_file() and row["log"].endswith("_log.err")
    assert "DataError" in row["detail"] and "cifar10" in row["detail"]
    assert "FAILED" in row["detail"]
    assert "logs of failed runs:" in launcher.format_status([row])
    # a failed run is submitted again (its ledger keeps the old job id)
    (again,) = launcher.submit_sweep([cfg], OPTIONS)
    subprocess.run(["scancel", again], check=True)
    assert _ledger(results.run_dir(tmp_path, cfg.run_path))["previous"] == [job_id]


def test_slurm_flags_without_slurm_and_slurm_without_srun_are_one_line_errors(tmp_path):
    def run(argv, path):
        return subprocess.run([sys.executable, "-m", "paper_repro", *argv], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PATH": path})

    base = ["sweep", "table1", "--scale", "smoke", "--results-dir", str(tmp_path)]
    done = run(base + ["--partition", "gpu"], os.environ["PATH"])
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--partition only applies with --slurm" in done.stderr
    done = run(base + ["--slurm"], str(tmp_path))  # a PATH without srun
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "slurm/cluster/start.sh" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_without_slurm_the_sweep_runs_through_submitits_local_executor(tmp_path):
    cfg = tiny_config(tmp_path)
    options = launcher.ExecutorOptions(time="00:10:00", cluster="local")
    (job_id,) = launcher.submit_sweep([cfg], options)  # waits: no scheduler to come back to
    (row,) = launcher.status([cfg])
    assert row["state"] == "done" and row["job_id"] == job_id
    assert launcher.submit_sweep([cfg], options) == []


def test_the_training_path_does_not_import_submitit():
    code = ("import sys, paper_repro.cli as c; c.build_parser(); import paper_repro.training.runner; "
            "sys.exit('submitit' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --- requeue ------------------------------------------------------------------------------------

def _epochs_per_start(log: Path) -> list[list[int]]:
    """Epoch numbers the job printed, split at each (re)start of the job."""
    starts: list[list[int]] = []
    for line in log.read_text().splitlines():
        if "Starting with JobEnvironment" in line:
            starts.append([])
        elif " epoch " in line and starts:
            starts[-1].append(int(line.split(" epoch ")[1].split("/")[0]))
    return starts


def test_a_requeued_job_resumes_from_its_checkpoint_to_the_uninterrupted_result(cluster, tmp_path):
    epochs = 30
    requeued, reference = (tiny_config(tmp_path / name, epochs=epochs, train_subset=1024)
                           for name in ("requeued", "reference"))
    job_id, _ = launcher.submit_sweep([requeued, reference], OPTIONS)  # one array, side by side
    directory = results.run_dir(requeued.results_dir, requeued.run_path)
    deadline = time.monotonic() + 120
    while not (directory / "checkpoint.pt").is_file():
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert not results.is_done(directory)
    rows = _wait([requeued, reference], timeout_s=240)
    assert [r["state"] for r in rows] == ["done", "done"], launcher.format_status(rows)

    deadline = time.monotonic() + 60  # the record is written a moment before the job ends
    while (states := [r["State"] for r in _sacct(job_id, "JobID,State", "--duplicates")]
           )[-1] != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    first, second = _epochs_per_start(Path(_ledger(directory)["stdout"]))
    assert first and first[-1] < epochs          # killed mid-run...
    assert second[0] > 1 and second[-1] == epochs  # ...and resumed from a checkpoint
    ref_dir = results.run_dir(reference.results_dir, reference.run_path)
    a, b = results.read_record(directory), results.read_record(ref_dir)
    assert (a["clean_acc"], a["pgd_acc"], a["steps_done"]) == \
        (b["clean_acc"], b["pgd_acc"], b["steps_done"])
    curves = [results.load_metrics(d).drop(columns=["train_time_s"]) for d in (directory, ref_dir)]
    pd.testing.assert_frame_equal(*curves)


# --- data parallel: N tasks per job -------------------------------------------------------------

def test_a_job_with_n_gpus_runs_n_tasks_and_ends_when_one_fails(tmp_path):
    """The sbatch script (no cluster needed): one task per GPU, and a failing rank ends the job
    instead of leaving the others waiting in a collective."""
    options = launcher.ExecutorOptions(gpus_per_job=4, cluster="slurm")
    executor = launcher._executor(options, tmp_path, "name", [])
    script = executor._executor._make_submission_file_text("python -c pass", "uid")
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "--kill-on-bad-exit=1" in script
    one = launcher._executor(launcher.ExecutorOptions(cluster="slurm"), tmp_path, "name", [])
    script = one._executor._make_submission_file_text("x", "uid")
    assert "ntasks-per-node" not in script and "kill-on-bad-exit" not in script  # one task
    cpu = launcher.ExecutorOptions(tasks_per_node=2, cpus_per_task=1, cluster="slurm")
    assert cpu.tasks() == 2 and launcher.ExecutorOptions(gpus_per_job=3).tasks() == 3


def test_tasks_and_gpus_that_disagree_are_a_one_line_error(tmp_path):
    fake = tmp_path / "bin" / "srun"  # --slurm looks for srun first; nothing may be submitted
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "paper_repro", "sweep", "table1", "--scale",
                           "smoke", "--slurm", "--gpus-per-job", "2", "--tasks-per-node", "3",
                           "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True,
                          env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "data-parallel jobs run one task per GPU" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_two_task_job_trains_like_one_task_and_resumes_after_a_preemption_signal(
        cluster, tmp_path):
    """A 2-task CPU job (gloo) against the same config as a 1-task job, the 2-task one
    preempted midway by SLURM's signal (scancel --signal=USR2, the signal submitit also gets
    `--signal` seconds before the time limit): submitit's checkpoint() runs on rank 0, which
    requeues the job; both ranks restart from rank 0's last epoch checkpoint.

    Tolerance (see tests/test_distributed.py for the argument and the measurements): the two
    ranks' averaged gradient is the full batch's up to float reassociation, but BatchNorm's
    batch statistics are per rank (32 of the 64 images), so the runs drift slightly apart:
    final clean accuracy within 2 pp on the 10,000 test images, PGD within 3 pp (6 of 200
    images), per-epoch training loss within 0.05. Exact: steps and FLOPs (each rank trained
    on half of every batch). That resuming with 2 tasks is exact is tested there too."""
    epochs = 10
    two, one = (tiny_config(tmp_path / name, epochs=epochs, train_subset=1024, eval_n=200)
                for name in ("two", "one"))
    (job_id,) = launcher.submit_sweep([two], dataclasses.replace(OPTIONS, tasks_per_node=2))
    launcher.submit_sweep([one], OPTIONS)  # queued until the 2-task job frees a CPU
    directory = results.run_dir(two.results_dir, two.run_path)
    deadline = time.monotonic() + 180
    while not (directory / "checkpoint.pt").is_file():
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    rows = _wait([two, one], timeout_s=420)
    assert [r["state"] for r in rows] == ["done", "done"], launcher.format_status(rows)

    deadline = time.monotonic() + 60
    while (states := [r["State"] for r in _sacct(job_id, "JobID,State", "--duplicates")]
           )[-1] != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    ledger = _ledger(directory)
    rank0 = Path(ledger["stdout"])
    rank1 = rank0.with_name(rank0.name.replace("_0_log.out", "_1_log.out"))
    both = rank0.read_text() + Path(ledger["stderr"]).read_text()
    assert "this job is preempted" in both and "Calling checkpoint method" in both
    assert "Not checkpointing nor requeuing" in rank1.read_text() + \
        rank1.with_suffix(".err").read_text()  # rank 1 got the signal and left it to rank 0
    first, second = _epochs_per_start(rank0)
    assert first and first[-1] < epochs
    # resumed after the last epoch it printed (printed after its checkpoint): nothing lost
    assert second[0] > first[-1] and second[-1] == epochs

    a = results.read_record(directory)
    b = results.read_record(results.run_dir(one.results_dir, one.run_path))
    assert a["hardware"]["processes"] == 2 and b["hardware"]["processes"] == 1
    assert (a["steps_done"], a["train_flops"]) == (b["steps_done"], b["train_flops"])
    assert abs(a["clean_acc"] - b["clean_acc"]) <= 2.0, (a["clean_acc"], b["clean_acc"])
    assert abs(a["pgd_acc"] - b["pgd_acc"]) <= 3.0, (a["pgd_acc"], b["pgd_acc"])
    curves = [results.load_metrics(d)["train_loss"]
              for d in (directory, results.run_dir(one.results_dir, one.run_path))]
    assert (curves[0] - curves[1]).abs().max() <= 0.05
    print(f"2 tasks: clean {a['clean_acc']} PGD {a['pgd_acc']}; "
          f"1 task: clean {b['clean_acc']} PGD {b['pgd_acc']}")
