"""report/paired.py: AFT − PGD AT differences are paired by seed, shown at each row's select
(the early-stopped view at its best epoch), with a Student-t 95% interval and FLOP ratios."""
from __future__ import annotations

import math

import pytest

from paper_repro import results
from paper_repro.report.paired import interval, paired_frame, write_paired


def test_the_interval_is_students_t_on_the_paired_differences():
    import pandas as pd
    mean, low, high = interval(pd.Series([1.0, 2.0, 3.0]))  # mean 2, sd 1, n 3
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))


def _run(store, row, seed, **record):
    d = results.run_dir(store, f"cpu/table1/{row}/seed{seed}")
    results.atomic_write_json(d / "config.json", {
        "experiment": "table1", "row": row, "scale": "cpu", "seed": seed,
        "method": "aft" if row == "aft" else "pgd_at", "arch": "mlp",
        "dataset": "fashion-mnist", "config_hash": f"{row}{seed}"})
    results.atomic_write_json(d / "record.json", {"status": "done", "cell_hash": row, **record})


def test_pairs_are_matched_by_seed_and_views_use_the_best_epoch(tmp_path):
    for seed, (pgd, best) in enumerate([(50.0, 56.0), (52.0, 57.0), (51.0, 55.0)]):
        _run(tmp_path, "pgd_at", seed, clean_acc=80.0, pgd_acc=pgd, aa_acc=pgd - 1,
             best_epoch=20, best_clean_acc=75.0, best_pgd_acc=best, best_aa_acc=best - 1,
             train_flops=100.0)
    for seed, pgd in enumerate([51.0, 52.0, 53.0, 60.0]):  # seed 3 has no PGD AT partner
        _run(tmp_path, "aft", seed, clean_acc=74.0, pgd_acc=pgd, aa_acc=pgd - 2,
             train_flops=5.0, pretrain_flops=10.0)
    frame = paired_frame("table1", "cpu", tmp_path).set_index(["baseline", "metric"])
    final = frame.loc[("pgd_at", "PGD-20")]
    assert final["seeds"] == 3 and final["per_seed"] == "+1.0 / +0.0 / +2.0"
    assert final["mean_diff"] == pytest.approx(1.0)
    es = frame.loc[("pgd_at_es", "PGD-20")]
    assert es["per_seed"] == "-5.0 / -5.0 / -2.0" and es["mean_diff"] == pytest.approx(-4.0)
    assert frame.loc[("pgd_at_es", "clean"), "mean_diff"] == pytest.approx(-1.0)
    assert frame.loc[("pgd_at", "AA"), "mean_diff"] == pytest.approx(0.0)
    assert (final["flops_ratio"], final["flops_ratio_with_pretrain"]) == (0.05, 0.15)
    md = [p for p in write_paired("table1", "cpu", tmp_path) if p.suffix == ".md"][0]
    assert "AFT − PGD AT (early stop)" in md.read_text()
    assert write_paired("table3", "cpu", tmp_path) == []  # no pairs defined there


def test_fewer_than_two_common_seeds_write_nothing(tmp_path):
    _run(tmp_path, "pgd_at", 0, clean_acc=80.0, pgd_acc=50.0, aa_acc=49.0, train_flops=1.0)
    _run(tmp_path, "aft", 0, clean_acc=74.0, pgd_acc=51.0, aa_acc=49.0, train_flops=1.0)
    assert paired_frame("table1", "cpu", tmp_path).empty
    assert write_paired("table1", "cpu", tmp_path) == []
