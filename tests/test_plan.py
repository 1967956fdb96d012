"""plan.py: what a sweep costs before it runs. The planned steps and FLOPs of smoke rows, and of
a tiny run of every registered method, equal what their real runs record (the counted minibatch
scales exactly; a pre-training is in the plan once); bench's MFU is used where it measured the
GPU; bad input is one line."""
from __future__ import annotations

import json

import pytest
import torch

from paper_repro import results
from paper_repro.orchestration import local
from paper_repro.models.weights import load_weights
from paper_repro.data import dataset_info
from paper_repro.data.splits import load_test_set
from paper_repro.robustness.evaluation import final_evaluation
from paper_repro.training.flops import TotalFlopCounter
from paper_repro.models import build_model
from paper_repro.cli import main
from paper_repro.experiment import load_experiment
from conftest import tiny_config
from paper_repro.training.methods import get_method, list_methods, resolve_row
from paper_repro.perf.gpus import get_gpu
from paper_repro.perf.plan import plan_costs, render

TABLE1 = load_experiment("table1")


def _smoke_row(row: str, store) -> object:
    return resolve_row(TABLE1, row, "smoke", overrides={"results_dir": str(store),
                                                        "eval_checks": False})


@pytest.mark.parametrize("row", ["free_at", "aft"])  # replays; a pre-training first
def test_planned_steps_and_flops_are_what_the_run_records(tmp_path, row):
    cfg = _smoke_row(row, tmp_path)
    costs = plan_costs([cfg], "h100", bench_dir=tmp_path / "no-bench")
    local.train_with_prerequisites(cfg, quiet=True)
    assert [c.run_path for c in costs][-1] == cfg.run_path
    assert len(costs) == (2 if row == "aft" else 1)  # AFT: its natural pre-training first
    for cost in costs:
        record = results.read_record(results.run_dir(tmp_path, cost.run_path))
        assert (cost.steps, cost.train_flops) == (record["steps_done"], record["train_flops"])
        assert cost.mfu_source == "default" and cost.gpu_hours == pytest.approx(
            cost.total_flops / (get_gpu("h100").peak_tflops * 1e12 * cost.mfu) / 3600)
    # the final evaluation's FLOPs, counted on the trained model, are the planned ones too
    directory = results.run_dir(tmp_path, cfg.run_path)
    model = build_model(cfg, dataset_info(cfg.dataset))
    load_weights(model, directory / "checkpoint.pt")
    test_x, test_y = load_test_set(cfg)
    with TotalFlopCounter() as counter:
        final_evaluation(model, test_x, test_y, cfg, torch.device("cpu"))
    assert costs[-1].eval_flops == counter.get_total_flops() > 0


@pytest.mark.parametrize("method", list_methods())
def test_every_method_is_planned_as_it_trains(tmp_path, method):
    """The registry's methods, each a one-epoch tiny run (a fine-tuning method's one-epoch
    pre-training first): plan's optimiser steps and training FLOPs are what the runs record."""
    extra = {"pretrain": {"epochs": 1}} if get_method(method).fine_tunes else {}
    cfg = tiny_config(tmp_path, method=method, epochs=1, **extra)
    costs = plan_costs([cfg], "h100", bench_dir=tmp_path / "no-bench")
    local.train_with_prerequisites(cfg, quiet=True)
    assert [c.run_path for c in costs][-1] == cfg.run_path
    assert len(costs) == (2 if get_method(method).fine_tunes else 1)
    for cost in costs:
        record = results.read_record(results.run_dir(tmp_path, cost.run_path))
        assert (cost.steps, cost.train_flops) == (record["steps_done"], record["train_flops"])
        assert cost.train_flops > 0 and cost.eval_flops > 0


def test_bench_mfu_is_used_where_bench_measured_that_gpu(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "nvidia-h100.json").write_text(json.dumps({"entries": [
        {"device": "NVIDIA H100 80GB HBM3", "method": "pgd_at", "arch": "mlp",
         "mfu_datasheet": 0.4},
        {"device": "NVIDIA A100-SXM4-80GB", "method": "natural", "arch": "mlp",
         "mfu_datasheet": 0.3}]}))
    configs = [_smoke_row(r, tmp_path) for r in ("pgd_at", "natural")]
    pgd, natural = plan_costs(configs, "h100", bench_dir=bench)
    assert (pgd.mfu, pgd.mfu_source) == (0.4, "bench on h100")
    assert natural.mfu_source == "default"  # measured on an A100, not this GPU
    (a100_natural,) = plan_costs(configs[1:], "a100", bench_dir=bench)
    assert (a100_natural.mfu, a100_natural.mfu_source) == (0.3, "bench on a100")
    assert pgd.gpu_hours == pytest.approx(pgd.total_flops / (989.4e12 * 0.4) / 3600)


def test_the_plan_prints_every_run_and_a_total(capsys):
    assert main(["plan", "table1", "--scale", "smoke", "--gpu", "a100",
                 "--gpus-per-job", "2"]) == 0
    out = capsys.readouterr().out
    trained = list(dict.fromkeys(TABLE1.source_row(r) for r in TABLE1.row_ids))  # no views
    for row in trained:
        assert f"smoke/table1/{row}/seed0" in out
    assert "smoke/table1/pgd_at_es/" not in out  # a view of pgd_at's run costs nothing more
    assert "smoke/pretrain/" in out and "| total" in out and "GPU-hours on a100" in out
    table = [line for line in out.splitlines() if line.startswith("| smoke/")]
    assert len(table) == len(trained) + 2  # AFT's and the self-training pre-training


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "tpu"], "unknown GPU 'tpu'"),
    (["--gpu", "h100", "--mfu", "1.5"], "--mfu must be in"),
    (["--gpu", "h100", "--gpus-per-job", "0"], "--gpus-per-job must be >= 1"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["plan", "table1", "--scale", "smoke", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err


def test_render_sums_the_runs(tmp_path):
    costs = plan_costs([_smoke_row("pgd_at", tmp_path)], "v100", mfu=0.5)
    text = render(costs, "v100")
    assert "0.50 (--mfu)" in text and "1 runs" in text


def test_slurm_submission_prints_the_plan_first(monkeypatch, capsys):
    import shutil

    if shutil.which("srun") is None:
        pytest.skip("--slurm needs srun on PATH")
    submitted = []

    def fake_submit(configs, options):
        submitted.append(capsys.readouterr().out)  # what was printed before submitting
        return []

    monkeypatch.setattr("slurm.launcher.submit_sweep", fake_submit)
    assert main(["sweep", "table1", "--scale", "smoke", "--rows", "natural,aft", "--slurm",
                 "--plan-gpu", "a100"]) == 0
    (before,) = submitted
    assert "| smoke/table1/aft/seed0" in before and "GPU-hours on a100" in before
    assert main(["sweep", "table1", "--scale", "smoke", "--rows", "natural", "--slurm"]) == 0
    assert "GPU-hours" not in submitted[1]  # below paper scale only with --plan-gpu
