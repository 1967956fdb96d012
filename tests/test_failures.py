"""Runs that survive anything: SIGKILL at any point, torn checkpoints, divergence, many
concurrent writers, and records that say where they came from.

The kill tests run the real CLI in a subprocess and let paper_repro/faults.py SIGKILL it at a
named point (REPRO_FAULT); the killed run is restarted with `--resume` until it finishes, and
its final metrics must equal those of an uninterrupted run exactly (deterministic mode, CPU).
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from paper_repro import cli, results
from paper_repro.runtime import provenance
from paper_repro.store import locks
from paper_repro.training import runner
from paper_repro.errors import CheckpointError
from paper_repro.report.tables import display_frame, table_frame
from conftest import tiny_config
from test_data import _write_cifar10

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--arch", "cnn-small", "--set", "model_args.width=4", "--dataset", "cifar10",
        "--train-subset", "128", "--batch-size", "64", "--epochs", "2", "--eps", "8/255",
        "--eval-n", "16", "--set", "eval_steps=2", "--set", "monitor_n=8",
        "--set", "monitor_steps=1", "--set", "eval_batch=64", "--device", "cpu",
        "--set", "aa_n=0", "--deterministic", "--scale", "smoke"]
METHOD = {
    "natural": ["--method", "natural"],
    "pgd_at": ["--method", "pgd_at", "--set", "method_args.steps=2"],
    "aft": ["--method", "aft", "--set", "method_args.steps=2",
            "--set", "pretrain={epochs = 2, batch_size = 64}"],
}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Tiny CIFAR-10 files in torchvision's on-disk format: 130 train and 40 test images."""
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar10(str(root / "cifar-10-batches-py"), per_batch=26, test=40)
    return root


def _argv(method: str, root: Path, store: Path) -> list[str]:
    return ["run", *METHOD[method], *SIZE, "--data-root", str(root), "--results-dir", str(store)]


def _tiny(root: Path, store: Path, **overrides):
    """conftest's tiny config on the tiny CIFAR files (no 10k-image test set to evaluate)."""
    values = dict(dataset="cifar10", data_root=str(root), train_subset=128, eval_n=16,
                  monitor_n=8)
    return tiny_config(store, **{**values, **overrides})


def _run_killed(argv: list[str], fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("REPRO_FAULT", None)
    if fault:
        env["REPRO_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "paper_repro", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _run_dir(store: Path, method: str) -> Path:
    return store / "runs" / "smoke" / "adhoc" / method / "seed0"


def _final(directory: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    record = json.loads((directory / "record.json").read_text())
    metrics = pd.read_csv(directory / "metrics.csv").drop(columns="train_time_s")
    return record, metrics, pd.read_csv(directory / "lr.csv")


def _assert_same_result(killed: Path, straight: Path) -> None:
    a, a_metrics, a_lr = _final(killed)
    b, b_metrics, b_lr = _final(straight)
    assert a["status"] == b["status"] == results.STATUS_DONE
    for key in ("clean_acc", "pgd_acc", "epochs_done", "steps_done", "train_flops",
                "config_hash"):
        assert a[key] == b[key], key
    pd.testing.assert_frame_equal(a_metrics, b_metrics)
    pd.testing.assert_frame_equal(a_lr, b_lr)
    assert not list(killed.glob(f".*{results.TEMP_SUFFIX}")), "a killed write's temp file stayed"


# (method, faults of the successive killed processes, then one --resume that finishes).
# Every point is covered at least once, every method at least once; a process's fault counts
# start at 1 in that process.
KILL_CHAINS = {
    # mid-epoch 2; then mid-write of epoch 2's checkpoint; then mid-write of the "done" record
    "natural": ["step:3", "checkpoint-write:1", "record-write:2"],
    # after the final evaluation (then checkpoint.pt is torn by hand, see below)
    "pgd_at": ["eval:1"],
    # mid pre-training epoch 2 (its fine-tuning is killed nowhere: `step` is natural's)
    "aft": ["pretrain-step:3"],
}


@pytest.mark.parametrize("method", list(KILL_CHAINS))
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, cifar_root,
                                                                   method, capsys):
    assert cli.main(_argv(method, cifar_root, tmp_path / "straight")) == 0
    capsys.readouterr()
    store = tmp_path / "killed"
    directory = _run_dir(store, method)
    for i, fault in enumerate(KILL_CHAINS[method]):
        argv = _argv(method, cifar_root, store) + (["--resume"] if i else [])
        proc = _run_killed(argv, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
        record = results.read_record(directory) or {}
        assert record.get("status") != results.STATUS_DONE, f"claims done after {fault}"
    if method == "pgd_at":  # a torn checkpoint.pt: detected, the previous good one is used
        checkpoint = directory / "checkpoint.pt"
        assert results.previous_checkpoint(checkpoint).is_file()
        checkpoint.write_bytes(checkpoint.read_bytes()[:-4096])
    proc = _run_killed(_argv(method, cifar_root, store) + ["--resume"], None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if method == "pgd_at":
        warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and "checkpoint.pt" in warnings[0] \
            and "resuming from checkpoint.prev.pt (epoch 1)" in warnings[0], proc.stderr
    _assert_same_result(directory, _run_dir(tmp_path / "straight", method))
    if method == "aft":
        pretrain = [d for d in (store / "runs" / "smoke" / "pretrain").iterdir()]
        assert len(pretrain) == 1 and results.is_done(pretrain[0])


def test_a_checkpoint_flipped_in_the_middle_is_detected(tmp_path):
    """torch.load does not check CRCs: a bit flip inside a tensor would load silently."""
    path = tmp_path / "checkpoint.pt"
    results.atomic_torch_save({"model": {"w": torch.zeros(4096)}, "epoch": 1}, path)
    results.atomic_torch_save({"model": {"w": torch.ones(4096)}, "epoch": 2}, path)
    assert results.check_checkpoint(path) is None
    assert torch.load(results.previous_checkpoint(path), weights_only=True)["epoch"] == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["epoch"] == 2  # torch alone does not notice
    assert "CRC" in results.check_checkpoint(path)


def test_a_save_stopped_between_its_renames_leaves_checkpoint_pt(tmp_path, monkeypatch):
    """The pool's Ctrl-C can land mid-save: at every moment there is a checkpoint.pt (the old
    one, until the new one is renamed over it), never only a checkpoint.prev.pt."""
    path = tmp_path / "checkpoint.pt"
    results.atomic_torch_save({"model": {"w": torch.zeros(4)}, "epoch": 1}, path)
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(dst) == path:  # the last step: the new checkpoint over the old one
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_torch_save({"model": {"w": torch.ones(4)}, "epoch": 2}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert torch.load(results.previous_checkpoint(path), weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    results.atomic_torch_save({"model": {"w": torch.ones(4)}, "epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert torch.load(results.previous_checkpoint(path), weights_only=True)["epoch"] == 1


def test_no_usable_checkpoint_is_one_clear_error(tmp_path, cifar_root):
    cfg = _tiny(cifar_root, tmp_path, epochs=1)
    runner.train_run(cfg, quiet=True)
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    (directory / "record.json").unlink()  # pretend it never finished
    (directory / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        runner.train_run(cfg, quiet=True)


def test_a_run_being_trained_is_not_trained_twice(tmp_path, cifar_root):
    cfg = _tiny(cifar_root, tmp_path, epochs=1)
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    directory.mkdir(parents=True)
    with results.run_lock(directory):
        assert results.is_locked(directory)
        with pytest.raises(runner.ReproError, match="being trained by another process"):
            runner.train_run(cfg, quiet=True)
    assert not results.is_locked(directory)
    assert runner.train_run(cfg, quiet=True)["status"] == results.STATUS_DONE


def test_a_store_that_cannot_lock_warns_once_and_the_record_says_so(tmp_path, monkeypatch,
                                                                    capsys):
    """A file system without locks (some NFS mounts): the run trains unguarded, says so in one
    warning line, and its record has `locked: false`; a locked run's record has no such key."""
    locked_run = runner.train_run(tiny_config(tmp_path / "locks", epochs=1), quiet=True)
    assert "locked" not in locked_run
    capsys.readouterr()

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    cfg = tiny_config(tmp_path / "nfs", epochs=1)
    record = runner.train_run(cfg, quiet=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "lock" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: cannot lock")
    assert os.strerror(errno.ENOLCK) in warnings[0]
    stored = results.read_record(results.run_dir(cfg.results_dir, cfg.run_path))
    assert record["status"] == stored["status"] == results.STATUS_DONE
    assert record["locked"] is stored["locked"] is False


# --- divergence ------------------------------------------------------------------------------

def test_divergence_fails_the_run_and_the_table_says_so(tmp_path, cifar_root, capsys):
    # epoch 2's learning rate is 1e30: the loss overflows to Inf/NaN there
    cfg = _tiny(cifar_root, tmp_path, experiment="table1", schedule="piecewise",
                schedule_args={"milestones": [0.5], "gamma": 1e30})
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    with pytest.raises(runner.TrainingDiverged, match="diverged at epoch 2"):
        runner.train_run(cfg, quiet=True)
    record = results.read_record(directory)
    assert record["status"] == results.STATUS_FAILED and record["failed_epoch"] == 2
    assert "non-finite" in record["reason"] and "clean_acc" not in record
    kept = torch.load(directory / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1  # the last good checkpoint
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    table = table_frame("table1", "smoke", tmp_path).set_index("row")
    assert table.loc["natural", "status"] == "failed (epoch 2)"
    assert pd.isna(table.loc["natural", "clean_acc"]) and pd.isna(table.loc["natural", "pgd_acc"])
    shown = display_frame(table.reset_index()).set_index("Method")
    natural = shown.loc[shown.index[0]]
    assert natural["Clean"] == "" and natural["PGD"] == "" and natural["Status"].startswith("failed")
    capsys.readouterr()
    assert cli.main(["status", "table1", "--rows", "natural", "--scale", "smoke",
                     "--results-dir", str(tmp_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "table1/natural" in ln)
    assert "failed" in line and "non-finite" in line


# --- concurrent writers ----------------------------------------------------------------------

def _finish_fake_run(store: str, k: int, barrier) -> None:
    """What the runner writes at the end of a run, for run k (no training needed)."""
    directory = results.run_dir(store, f"smoke/table1/pgd_at/seed{k}")
    barrier.wait()  # all 50 start writing at the same moment
    results.atomic_write_json(directory / "config.json",
                              {"experiment": "table1", "row": "pgd_at", "scale": "smoke",
                               "seed": k, "method": "pgd_at", "arch": "cnn-small",
                               "dataset": "fashion-mnist", "config_hash": f"h{k}"})
    results.write_record(directory, {"status": results.STATUS_RUNNING, "epochs_done": 0})
    results.write_metrics(directory / "metrics.csv",
                          [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "test_clean_acc": 80.0,
                            "test_pgd_acc": 40.0, "train_pgd_acc": 45.0} for e in (1, 2, 3)])
    results.write_record(directory, {"status": results.STATUS_DONE, "cell_hash": "cell",
                                     "config_hash": f"h{k}", "clean_acc": 80.0 + k % 3,
                                     "pgd_acc": 40.0, "train_minutes": 0.5, "eval_n": 100,
                                     "run_path": f"smoke/table1/pgd_at/seed{k}",
                                     "train_flops": 1e12, "padding": "x" * 20_000})


def test_fifty_processes_finishing_runs_at_once(tmp_path):
    n = 50
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_finish_fake_run, args=(str(tmp_path), k, barrier))
             for k in range(n)]
    for p in procs:
        p.start()
    seen_partial = 0
    while any(p.is_alive() for p in procs):  # read the store while it is being written
        for path in tmp_path.glob("runs/**/record.json"):
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError:
                seen_partial += 1
            except FileNotFoundError:
                pass
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen_partial == 0
    frame = results.load(tmp_path)
    assert len(frame) == n and set(frame["status"]) == {results.STATUS_DONE}
    assert sorted(frame["seed"]) == list(range(n))
    assert not list(tmp_path.glob(f"runs/**/.*{results.TEMP_SUFFIX}"))
    table = table_frame("table1", "smoke", tmp_path).set_index("row")
    assert table.loc["pgd_at", "n_seeds"] == n
    assert cli.main(["aggregate", "--scale", "smoke", "--results-dir", str(tmp_path)]) == 0
    csv = pd.read_csv(tmp_path / "tables" / "smoke" / "table1.csv").set_index("row")
    assert csv.loc["pgd_at", "n_seeds"] == n and csv.loc["pgd_at", "clean_acc"] > 80
    assert (tmp_path / "figures" / "smoke" / "fig1.png").stat().st_size > 0


# --- provenance ------------------------------------------------------------------------------

def test_every_record_says_where_it_came_from(tmp_path, cifar_root):
    cfg = _tiny(cifar_root, tmp_path, epochs=1)
    record = runner.train_run(cfg, quiet=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    code = record["code"]
    assert code["git_sha"] == (head or "unknown") and isinstance(code["git_dirty"], bool)
    import numpy
    import torchvision
    assert code["torch"] == torch.__version__ and code["torchvision"] == torchvision.__version__
    assert code["numpy"] == numpy.__version__ and code["python"] == sys.version.split()[0]
    assert record["config_hash"] == cfg.config_hash() and record["cell_hash"] == cfg.cell_hash()
    hardware = record["hardware"]
    assert hardware["cpu"] and hardware["cpu_count"] >= 1
    assert ("gpu" in hardware) == torch.cuda.is_available()
    stored = json.loads((results.run_dir(cfg.results_dir, cfg.run_path) / "config.json")
                        .read_text())
    assert stored["config_hash"] == cfg.config_hash()


def test_the_dirty_flag_is_about_the_code_not_the_results_store(tmp_path):
    """A sweep writes into results/ as it goes; only a changed code file makes a record say
    its code was not the commit's."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "record.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    (tmp_path / "results" / "record.json").write_text('{"status": "done"}')
    assert provenance.code_version(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.code_version(tmp_path)["git_dirty"] is True


def test_aggregate_refuses_to_mix_configs_in_one_cell(tmp_path, capsys):
    for seed, cell in ((0, "c1"), (1, "c2")):
        directory = results.run_dir(tmp_path, f"smoke/table1/pgd_at/seed{seed}")
        results.atomic_write_json(directory / "config.json", {
            "experiment": "table1", "row": "pgd_at", "scale": "smoke", "seed": seed,
            "method": "pgd_at", "arch": "cnn-small", "dataset": "fashion-mnist",
            "config_hash": f"{cell}-{seed}"})
        results.write_record(directory, {"status": "done", "clean_acc": 80.0, "pgd_acc": 50.0,
                                         "train_minutes": 1.0, "train_flops": 1e12,
                                         "eval_n": 10, "cell_hash": cell})
    assert cli.main(["aggregate", "--scale", "smoke", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different configs" in err[0] and "c1, c2" in err[0]
    assert not (tmp_path / "tables" / "smoke" / "table1.csv").exists()


def test_status_tells_an_interrupted_run_from_a_running_one(tmp_path, capsys):
    directory = results.run_dir(tmp_path, "smoke/table1/natural/seed0")
    results.write_record(directory, {"status": results.STATUS_RUNNING, "epochs_done": 1})
    argv = ["status", "table1", "--rows", "natural", "--scale", "smoke",
            "--results-dir", str(tmp_path)]

    def natural_line() -> str:
        assert cli.main(argv) == 0
        return next(ln for ln in capsys.readouterr().out.splitlines() if "table1/natural" in ln)

    assert "interrupted" in natural_line() and "--resume" in natural_line()
    with results.run_lock(directory):  # what a live training process holds
        line = natural_line()
        assert "running" in line and "interrupted" not in line


def test_a_cell_with_a_failed_seed_says_so(tmp_path):
    for seed, status in ((0, "done"), (1, "failed")):
        directory = results.run_dir(tmp_path, f"smoke/table1/pgd_at/seed{seed}")
        results.atomic_write_json(directory / "config.json", {
            "experiment": "table1", "row": "pgd_at", "scale": "smoke", "seed": seed,
            "method": "pgd_at", "arch": "cnn-small", "dataset": "fashion-mnist"})
        results.write_record(directory, {"status": status, "clean_acc": 80.0, "pgd_acc": 50.0,
                                         "train_minutes": 1.0, "train_flops": 1e12,
                                         "eval_n": 10, "cell_hash": "c", "failed_epoch": 3})
    row = table_frame("table1", "smoke", tmp_path).set_index("row").loc["pgd_at"]
    assert row["status"] == "done (1 failed)" and row["n_seeds"] == 1
