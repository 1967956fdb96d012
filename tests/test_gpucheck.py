"""gpucheck.py (issue 15, item 4): without a GPU one line and exit 0 (also through
reproduce.sh); every piece runs on the CPU at a tiny scale, without submitit or the other
packages the GPU machine lacks; the budget skips what does not fit, interrupts what overruns,
and says so; Table 1's hours are each row's epochs × its per-epoch time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paper_repro.experiment import load_experiment
from paper_repro.perf.budget import Budget, run_piece
from paper_repro.perf import gpucheck
from paper_repro.training.methods import resolve_row
from paper_repro.cli import main

REPO = Path(__file__).resolve().parent.parent
# The GPU machine has torch, torchvision, timm and pandas (and what they need), nothing else.
ABSENT_ON_THE_GPU_MACHINE = ("submitit", "seaborn", "matplotlib", "sklearn", "scipy",
                             "tabulate", "pyautoattack", "autoattack", "torchattacks")
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # the same answer on a CI machine that has one
# Table 1's rows that train (a view shows another row's run), from the experiment file
TRAINED_ROWS = [r["id"] for r in load_experiment("table1").rows if "view_of" not in r]


def _run_without_optional_packages(*args: str) -> subprocess.CompletedProcess:
    """`python -m paper_repro ARGS` in a fresh interpreter where importing any package of
    ABSENT_ON_THE_GPU_MACHINE fails."""
    code = ("import runpy, sys\n"
            f"for name in {ABSENT_ON_THE_GPU_MACHINE!r}:\n"
            "    sys.modules[name] = None  # import name -> ImportError\n"
            f"sys.argv = ['paper_repro', *{list(args)!r}]\n"
            "runpy.run_module('paper_repro', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **NO_GPU})


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    done = _run_without_optional_packages("gpucheck")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA GPU" in done.stdout
    assert done.stderr == ""


def test_reproduce_sh_gpucheck_without_a_gpu(tmp_path):
    env = {**os.environ, **NO_GPU, "REPRO_VENV": sys.prefix}
    done = subprocess.run(["bash", str(REPO / "reproduce.sh"), "gpucheck"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA GPU" in done.stdout


def test_every_piece_runs_on_the_cpu_at_tiny_scale(tmp_path):
    done = _run_without_optional_packages("gpucheck", "--device", "cpu", "--tiny",
                                          "--results-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((tmp_path / "bench" / "cpu-tiny.json").read_text())
    check = data["gpucheck"]
    assert check["skipped"] == [] and check["failed"] == []
    # the bench of every pair eager (every method a row of table1 or modern trains), and of
    # the first pairs compiled
    eager = {e["method"] for e in data["entries"] if not e["compile"]}
    assert eager == {row["method"] for name in gpucheck.EXPERIMENTS
                     for row in load_experiment(name).rows if "view_of" not in row}
    compiled = [e for e in data["entries"] if e["compile"]]
    assert {e["method"] for e in compiled} == {m for m, _ in
                                               gpucheck.bench_pairs()[:gpucheck.TINY.compiled_pairs]}
    for e in data["entries"]:
        assert e["precision"] == "bf16" and e["images_per_s"] > 0
    for e in compiled:
        assert e["compiled_attack_graphs"] >= 1 and e["wgrad_in_attack"] is False
        assert e["recompiles_while_timed"] == 0
    # the whole (tiny) epoch, and the bf16-vs-fp32 check on the model it trained
    epoch = check["pgd10_epoch"]
    assert epoch["complete"] and epoch["steps"] == epoch["steps_per_epoch"] == 64 // 8
    bf16 = check["bf16_vs_fp32_pgd20"]
    assert bf16["images"] == 64 and bf16["tolerance_pp"] == 0.5
    assert bf16["agree"] == (abs(bf16["pgd20_acc_bf16"] - bf16["pgd20_acc_fp32"]) <= 0.5)
    # Table 1's hours: each row's epochs x its per-epoch time, plus AFT's pre-training
    rows = {r["row"]: r for r in check["table1_hours"]}
    assert set(rows) == set(TRAINED_ROWS) >= {"natural", "pgd_at", "aft", "aft_500k"}
    for r in rows.values():
        hours = r["epochs"] * 50_000 / r["images_per_s"] / 3600
        if "pretrain_epochs" in r:
            hours += r["pretrain_epochs"] * r["pretrain_images"] / r["pretrain_images_per_s"] / 3600
        assert r["hours"] == pytest.approx(hours, abs=0.006)
    assert (rows["natural"]["epochs"], rows["pgd_at"]["epochs"], rows["aft"]["epochs"]) == \
        (200, 205, 10)
    assert rows["aft"]["pretrain_images"] == 50_000
    assert rows["aft_500k"]["pretrain_images"] == 550_000
    # the printed table: one line per row
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(TRAINED_ROWS) and "hours" in table[0]


def test_the_pairs_are_every_table1_run_then_the_later_methods_paired_rows_first():
    pairs = gpucheck.bench_pairs()
    table1 = load_experiment("table1")
    assert len(set(pairs)) == len(pairs)
    for row in TRAINED_ROWS:
        cfg = resolve_row(table1, row, "paper")
        assert (cfg.method, cfg.arch) in pairs, row
        if cfg.pretrain is not None:  # AFT's natural pre-training, on its architecture
            assert ("natural", cfg.arch) in pairs
    first = [resolve_row(table1, table1.source_row(r), "paper") for r in table1.pairs[0]]
    assert pairs[:2] == tuple((c.method, c.arch) for c in first) == \
        (("aft", "wrn-28-10"), ("pgd_at", "wrn-32-10"))
    table1_methods = {r["method"] for r in table1.rows if "view_of" not in r}
    modern = load_experiment("modern")
    later = [m for m, _ in pairs if m not in table1_methods]  # once each, after Table 1's
    assert later == list(dict.fromkeys(r["method"] for r in modern.rows if "view_of" not in r
                                       and r["method"] not in table1_methods))
    assert {"trades", "mart", "at_awp", "trades_awp"} <= set(later)
    assert pairs[-len(later):] == tuple(
        (m, resolve_row(modern, next(r["id"] for r in modern.rows if r.get("method") == m),
                        "paper").arch) for m in later)


def test_the_budget_skips_what_does_not_fit_and_says_so(tmp_path, capsys):
    assert main(["gpucheck", "--device", "cpu", "--tiny", "--budget-s", "0",
                 "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "bench aft wrn-28-10 eager" in out and "PGD-10 AT epoch" in out
    check = json.loads((tmp_path / "bench" / "cpu-tiny.json").read_text())["gpucheck"]
    pieces = len(gpucheck.bench_pairs()) + 1 + gpucheck.TINY.compiled_pairs
    assert len(check["skipped"]) == pieces and check["pgd10_epoch"] is None
    assert all(r["hours"] is None for r in check["table1_hours"])


def test_a_piece_whose_minimum_does_not_fit_is_not_started():
    budget, report = Budget(60), gpucheck.Report()
    ran = []
    run_piece("compile a WRN", 120, budget, report, lambda: ran.append(1))
    run_piece("bench", 1, budget, report, lambda: ran.append(2))
    assert ran == [2] and report.skipped == ["compile a WRN"] and not report.out_of_time


def test_a_piece_still_running_at_the_deadline_is_cut_off():
    budget, report = Budget(0.3), gpucheck.Report()
    handler = signal.getsignal(signal.SIGALRM)
    run_piece("sleeps", 0, budget, report, lambda: time.sleep(30))
    ran = []
    run_piece("after", 0, budget, report, lambda: ran.append(1))
    assert report.out_of_time and not ran
    assert report.skipped == ["sleeps (cut off at the deadline)", "after"]
    assert signal.getsignal(signal.SIGALRM) is handler  # the alarm is disarmed and restored
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_failing_piece_is_reported_and_the_others_still_run():
    budget, report = Budget(60), gpucheck.Report()
    run_piece("broken", 0, budget, report, lambda: 1 / 0)
    ran = []
    run_piece("next", 0, budget, report, lambda: ran.append(1))
    assert ran and report.failed == ["broken: ZeroDivisionError: division by zero"]
    assert "ZeroDivisionError" in report.tracebacks["broken"] and "next" not in report.tracebacks


def test_a_failed_piece_leaves_its_traceback_in_the_json(tmp_path, monkeypatch, capsys):
    """A GPU lease is scarce: the JSON keeps where each failed piece broke, not only its name."""
    def broken_bench(*args, **kwargs):
        raise RuntimeError("cuDNN refused the convolution")

    monkeypatch.setattr(gpucheck, "_measure", broken_bench)
    assert main(["gpucheck", "--device", "cpu", "--tiny", "--results-dir", str(tmp_path)]) == 1
    capsys.readouterr()
    check = json.loads((tmp_path / "bench" / "cpu-tiny.json").read_text())["gpucheck"]
    piece = "bench aft wrn-28-10 eager"
    assert f"{piece}: RuntimeError: cuDNN refused the convolution" in check["failed"]
    text = check["failed_tracebacks"][piece]
    assert text.startswith("Traceback (most recent call last)") and "broken_bench" in text
    assert text.rstrip().endswith("RuntimeError: cuDNN refused the convolution")
    assert set(check["failed_tracebacks"]) == {f.split(": ")[0] for f in check["failed"]}


def test_class_pattern_images_are_learnable_and_survive_flips():
    """One left-right symmetric pattern per class (a flipped image keeps its class), which a
    nearest-class-mean classifier fitted on one split recovers on another."""
    x, y = gpucheck.class_pattern_images(4000, seed=0)
    assert x.dtype == torch.uint8 and x.shape == (4000, 3, 32, 32)
    centred = x.float() / 255 - 0.5
    means = torch.stack([centred[y == c].mean(0) for c in range(10)])
    blocks = torch.nn.functional.avg_pool2d(means, 8)  # the 4x4 pattern, noise averaged out
    assert torch.allclose(blocks, blocks.flip(3), atol=0.01)
    assert blocks.abs().min() > 0.02  # every block carries the class's sign
    test_x, test_y = gpucheck.class_pattern_images(2000, seed=1)
    scores = (test_x.float() / 255 - 0.5).flatten(1) @ means.flatten(1).T
    assert (scores.argmax(1) == test_y).float().mean() > 0.85


@pytest.mark.parametrize("args,message", [
    (["--budget-s", "-1"], "--budget-s"),
    (["--device", "cpu"], "--tiny"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert main(["gpucheck", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
