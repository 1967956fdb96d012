"""gpus.py (issue 24, item 2): one table of GPU peaks that bench, plan and gpucheck read. For
every GPU of the table, PCIe cards included, the peak bench divides by on that device is the
peak plan multiplies the MFU by for the GPU name it gives that device, plan applies an MFU
measured on a card only to that card, and `plan --gpu NAME` accepts every name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from paper_repro.perf import bench
from paper_repro.perf import gpus
from paper_repro.perf import plan
from paper_repro.cli import main
from paper_repro.config import build_config
from paper_repro.errors import ConfigError

NAMES = gpus.names()


def test_the_table_has_the_cards_plan_and_bench_need():
    assert {"h100", "h100-pcie", "h200", "a100", "v100"} <= set(NAMES)
    assert gpus.get_gpu("h100-pcie").peak_tflops == 756.0 < gpus.get_gpu("h100").peak_tflops
    with pytest.raises(ConfigError, match="unknown GPU 'tpu'"):
        gpus.get_gpu("tpu")


@pytest.mark.parametrize("name", NAMES)
def test_each_example_device_matches_its_own_entry_only(name):
    example = gpus.get_gpu(name).example
    assert gpus.gpu_of(example) is gpus.get_gpu(name)
    matching = [g.name for g in gpus.GPUS if re.search(g.pattern, example, re.IGNORECASE)]
    assert matching == [name]  # the patterns exclude each other: the order does not matter


@pytest.mark.parametrize("name", NAMES)
def test_bench_and_plan_agree_on_the_peak_of_every_gpu(monkeypatch, name):
    """On a device called like the entry's example, bench divides by the same peak plan uses
    for the name it gives that device (`this_gpu`, what a local sweep plans with)."""
    example = gpus.get_gpu(name).example
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: example)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bench_peak = bench.datasheet_peak(torch.device("cuda"))
    assert plan.this_gpu() == name
    flops, mfu = 10**18, 0.5
    monkeypatch.setattr(plan, "cost_of", lambda cfg, run_path, gpu, m, measured: plan.RunCost(
        run_path, cfg.method, cfg.arch, 1, flops, 0, 0, 0, mfu, "stub"))
    (cost,) = plan.plan_costs([build_config(experiment="t", row="r", scale="smoke")], name,
                              bench_dir=Path("/nonexistent"))
    plan_peak = flops / (cost.gpu_hours * 3600 * mfu) / 1e12
    assert bench_peak == pytest.approx(plan_peak) == gpus.get_gpu(name).peak_tflops


def test_an_mfu_measured_on_a_card_is_applied_to_that_card_only(tmp_path):
    """A PCIe H100's MFU plans `--gpu h100-pcie` (against 756), not `--gpu h100` (989.4)."""
    (tmp_path / "all.json").write_text(json.dumps({"entries": [
        {"device": g.example, "method": g.name, "arch": "wrn-28-10", "mfu_datasheet": 0.3}
        for g in gpus.GPUS]}))
    for name in NAMES:
        assert plan.measured_mfu(name, tmp_path) == {(name, "wrn-28-10"): 0.3}


@pytest.mark.parametrize("name", NAMES)
def test_plan_accepts_every_name_of_the_table(monkeypatch, capsys, name):
    monkeypatch.setattr(plan, "cost_of", lambda cfg, run_path, gpu, m, measured: plan.RunCost(
        run_path, cfg.method, cfg.arch, 1, 10**18, 0, 0, 0, 0.25, "stub"))
    assert main(["plan", "table1", "--scale", "smoke", "--rows", "natural",
                 "--gpu", name]) == 0
    out = capsys.readouterr().out
    assert f"GPU-hours on {name} at {gpus.get_gpu(name).peak_tflops:g} TFLOP/s" in out
