"""The local pool (paper_repro/orchestration/pool.py): K runs at once over the graph of runs, each after what
it needs, a failed run's dependents blocked, Ctrl-C stopping every child, GPUs handed out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paper_repro import cli, results
from paper_repro.orchestration import pool
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from paper_repro.training.methods import get_method

# natural and the AFT(+500K) chain: teacher (= AFT's pre-training) -> student pre-training ->
# fine-tune, plus AFT on the teacher: five runs, two independent branches
ROWS = ("natural", "aft", "aft_500k")
VOLATILE = {"started_at", "started_at_unix", "finished_at", "finished_at_unix", "train_time_s",
            "train_minutes", "eval_time_s", "aa_time_s", "pretrain_minutes", "hardware", "code",
            "pretrain_source"}


def _configs(store: Path, rows=ROWS, seeds=(0,), **overrides):
    exp = load_experiment("table1")
    return [resolve_row(exp, row, "smoke", seed=seed,
                        overrides={"results_dir": str(store), **overrides})
            for row in rows for seed in seeds]


def _records(store: Path) -> dict[str, dict]:
    return {results.run_path_of(p.parent): json.loads(p.read_text())
            for p in sorted(results.runs_root(store).rglob("record.json"))}


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def _metrics(store: Path, run_path: str) -> list[dict]:
    import pandas as pd

    frame = pd.read_csv(results.run_dir(store, run_path) / "metrics.csv")
    return frame.drop(columns=[c for c in frame if c.endswith("time_s")]).to_dict("records")


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """The graph trained with K = 2 (child processes) and with K = 1 (this process)."""
    two, one = tmp_path_factory.mktemp("k2"), tmp_path_factory.mktemp("k1")
    outcome = pool.train_all(_configs(two), pool.Slots(jobs=2), say=lambda line: None)
    pool.train_all(_configs(one), pool.Slots(jobs=1), say=lambda line: None)
    return two, one, outcome


def test_every_run_of_the_graph_trains_once_after_what_it_needs(pooled):
    store, _one, outcome = pooled
    graph = pool.pipeline.plan(_configs(store))
    assert len(graph) == 5 and not outcome.failed and not outcome.blocked
    records = _records(store)
    assert set(records) == {run.run_path for run in graph.values()}
    assert all(r["status"] == "done" for r in records.values())
    # one submitit job per run, each named in the run's ledger
    ledgers = [json.loads((d / results.LEDGER).read_text()) for d in graph]
    assert len({led["job_id"] for led in ledgers}) == 5
    assert len([p for p in (store / "slurm").iterdir() if p.is_dir()]) == 5
    for directory, run in graph.items():
        mine = records[run.run_path]
        for need in run.needs:  # started only after everything it needs had finished
            assert mine["started_at_unix"] >= records[results.run_path_of(need)]["finished_at_unix"]
    assert any(run.needs for run in graph.values())


def test_never_more_than_k_at_once_and_the_slots_are_used(pooled):
    store, _one, _outcome = pooled
    spans = [(r["started_at_unix"], r["finished_at_unix"]) for r in _records(store).values()]
    running_at = [sum(s <= t < e for s, e in spans) for t, _ in spans]
    assert max(running_at) <= 2
    assert max(running_at) == 2  # natural's branch and AFT's chain overlap: K was used


def test_records_equal_a_sequential_run(pooled):
    two, one, _outcome = pooled
    a, b = _records(two), _records(one)
    assert set(a) == set(b)
    for run_path in a:
        assert a[run_path]["hardware"]["torch_threads"] == b[run_path]["hardware"]["torch_threads"] == 1
        assert _stable(a[run_path]) == _stable(b[run_path]), run_path
        assert _metrics(two, run_path) == _metrics(one, run_path), run_path


def test_a_failed_run_blocks_its_dependents_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_FAULT", "pretrain-step:1")  # every pre-training dies at its 1st step
    lines: list[str] = []
    outcome = pool.train_all(_configs(tmp_path), pool.Slots(jobs=2), say=lines.append)
    teacher = next(p for p in outcome.failed)
    assert "/pretrain/" in teacher and len(outcome.failed) == 1
    graph = {run.run_path for run in pool.pipeline.plan(_configs(tmp_path)).values()}
    # AFT, the student pre-training and AFT(+500K): everything but natural and the teacher
    assert set(outcome.blocked) == graph - {teacher, "smoke/table1/natural/seed0"}
    assert len(outcome.blocked) == 3
    assert all(need == teacher or need in outcome.blocked for need in outcome.blocked.values())
    records = _records(tmp_path)
    assert records["smoke/table1/natural/seed0"]["status"] == "done"
    for blocked in outcome.blocked:  # never started: no record, no job
        assert blocked not in records
        ledger = json.loads((results.run_dir(tmp_path, blocked) / results.LEDGER).read_text())
        assert ledger["state"] == "blocked" and not ledger["job_id"]
    assert any(line.startswith("blocked ") for line in lines)
    with pytest.raises(cli.ReproError, match="1 run.s. failed and 3 were blocked"):
        outcome.raise_if_failed()


def test_gpus_are_handed_out_one_per_concurrent_run(tmp_path, monkeypatch):
    """Without a GPU: the parent believes in two, and each child records the
    CUDA_VISIBLE_DEVICES it was given (it then trains on the CPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    slots = pool.Slots.resolve(gpus="0,1")
    assert slots == pool.Slots(jobs=2, gpus=(0, 1))
    configs = _configs(tmp_path, rows=("natural", "pgd_at", "fast_at", "atta"), device="cpu")
    outcome = pool.train_all(configs, slots, say=lambda line: None)
    assert not outcome.failed
    seen = [(r["started_at_unix"], r["finished_at_unix"], r["hardware"]["cuda_visible_devices"])
            for r in _records(tmp_path).values()]
    assert {gpu for *_span, gpu in seen} == {"0", "1"}
    for s, e, gpu in seen:  # two runs at the same time never share a GPU
        assert all(other != gpu for s2, e2, other in seen if (s2, e2) != (s, e) and s2 < e and s < e2)


def test_slots_from_flags(monkeypatch):
    import torch

    monkeypatch.delenv(pool.JOBS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pool.Slots.resolve() == pool.Slots(jobs=os.cpu_count() or 1)  # one per core
    monkeypatch.setenv(pool.JOBS_ENV, "3")
    assert pool.Slots.resolve().jobs == 3
    assert pool.Slots.resolve(jobs=1).jobs == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pool.Slots.resolve(gpus="all", gpus_per_run=2, jobs=None).gpus == (0, 1, 2, 3)
    assert pool.Slots.resolve(gpus="all", gpus_per_run=2).jobs == 2  # --gpus beats the env
    for bad, match in [(dict(jobs=0), "--jobs must be"), (dict(gpus="0,9"), "no GPU 9"),
                       (dict(gpus="a,b"), "--gpus expects"), (dict(gpus="1,1"), "distinct"),
                       (dict(gpus="0,1", jobs=3), "needs 3 GPUs"),
                       (dict(gpus="0", gpus_per_run=2), "only 1 GPU")]:
        with pytest.raises(cli.ReproError, match=match):
            pool.Slots.resolve(**bad)


def _children_of(store: Path) -> list[int]:
    """Live processes whose command line names the store (submitit's controllers and tasks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next((ln for ln in (proc / "status").read_text().splitlines()
                          if ln.startswith("State:")), "")
        except OSError:
            continue
        if str(store) in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return pids


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "REPRO_JOBS": ""}
    return subprocess.Popen([sys.executable, "-m", "paper_repro", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigint_stops_every_child_status_shows_the_pool_and_a_rerun_resumes(tmp_path):
    # long enough (~20 s per smoke run) that the runs are still training when `status` (a
    # second Python process on the same two cores) has answered and the parent gets SIGINT
    EPOCHS = 200
    store = tmp_path / "store"
    flags = ["--scale", "smoke", "--rows", "pgd_at", "--seeds", "3", "--results-dir", str(store),
             "--set", f"epochs={EPOCHS}", "--set", "monitor_n=0"]
    parent = _cli("sweep", "table1", "--jobs", "2", *flags)
    runs = [results.run_dir(store, f"smoke/table1/pgd_at/seed{k}") for k in range(3)]
    deadline = time.time() + 120
    while time.time() < deadline:  # both slots training, past their first epoch checkpoint
        started = [r for r in runs if (r / "checkpoint.pt").is_file()]
        if len(started) == 2:
            break
        time.sleep(0.5)
    assert len(started) == 2, parent.communicate(timeout=60)[0]

    status = subprocess.run([sys.executable, "-m", "paper_repro", "status", "table1", *flags],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "2 running, 1 queued" in status.stdout, status.stdout
    assert "waiting in the local pool" in status.stdout

    parent.send_signal(signal.SIGINT)  # the parent alone, not its process group
    out, _ = parent.communicate(timeout=120)
    assert parent.returncode == 130, out
    assert _children_of(store) == [], out
    interrupted = [results.read_record(r) for r in runs[:2]]
    import pandas as pd

    epochs_then = [pd.read_csv(r / "metrics.csv") for r in runs[:2]]
    assert all(r["status"] == "running" for r in interrupted)
    assert all((r / "checkpoint.pt").is_file() for r in runs[:2])
    assert results.read_record(runs[2]) is None  # the queued run never started
    after = subprocess.run([sys.executable, "-m", "paper_repro", "status", "table1", *flags],
                           capture_output=True, text=True, timeout=120)
    assert "2 interrupted, 1 not submitted" in after.stdout, after.stdout

    rerun = _cli("sweep", "table1", "--jobs", "2", *flags)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    for directory, before, then in zip(runs[:2], interrupted, epochs_then):
        record = results.read_record(directory)
        assert record["status"] == "done" and record["epochs_done"] == EPOCHS
        assert 1 <= len(then) < EPOCHS and record["started_at_unix"] > before["started_at_unix"]
        # resumed, not restarted: the epochs done before the interrupt keep their measured
        # times (a restart would have trained and timed them again)
        now = pd.read_csv(directory / "metrics.csv")
        assert len(now) == EPOCHS and now.head(len(then)).equals(then)


def test_adhoc_runs_honour_the_scale(tmp_path, capsys):
    assert cli.main(["run", "--method", "pgd_at", "--scale", "smoke",
                     "--results-dir", str(tmp_path)]) == 0
    config = json.loads((results.run_dir(tmp_path, "smoke/adhoc/pgd_at/seed0")
                         / "config.json").read_text())
    exp = load_experiment("table1")
    table1 = resolve_row(exp, "pgd_at", "smoke")
    for key in ("dataset", "arch", "model_args", "train_subset", "eps", "epochs", "eval_n",
                "val_n", "batch_size", "lr"):
        assert config[key] == getattr(table1, key), key
    assert config["dataset"] == "fashion-mnist" and config["epochs"] == 1
    # explicit flags win; an --arch of its own drops the stand-in's network options
    assert cli.main(["run", "--method", "pgd_at", "--scale", "smoke", "--epochs", "2",
                     "--arch", "cnn-small", "--name", "mine", "--max-steps", "1",
                     "--results-dir", str(tmp_path)]) == 0
    mine = json.loads((results.run_dir(tmp_path, "smoke/adhoc/mine/seed0")
                       / "config.json").read_text())
    assert mine["epochs"] == 2 and mine["arch"] == "cnn-small" and mine["model_args"] == {}
    # at paper scale: the method's own recipe
    paper = cli.train._adhoc_config("pgd_at", "paper", "pgd_at", 0, {}, scale="paper")
    assert paper.arch == get_method("pgd_at").recipe["arch"] and paper.train_subset is None


@pytest.mark.parametrize("command", [["table", "table1"], ["aggregate"], ["status", "table1"],
                                     ["export", "cpu/table1/aft/seed0", "--out", "OUT"]])
def test_a_store_that_does_not_exist_is_one_line(tmp_path, capsys, command):
    missing = tmp_path / "no-such-store"
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert cli.main(argv + ["--scale", "cpu"] * (command[0] != "export")
                    + ["--results-dir", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no results store at") and len(err.splitlines()) == 1
    assert not missing.exists() and not (tmp_path / "out").exists()
