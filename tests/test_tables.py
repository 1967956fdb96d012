"""report/tables.py: cells are computed from the store (mean ± std over seeds), never invented."""
from __future__ import annotations

import pandas as pd
import pytest

from paper_repro import results
from paper_repro.errors import ReproError
from paper_repro.report.tables import display_frame, table_frame, write_table


def _fake_run(store, row, seed, clean, pgd, cell="c1", status="done", **extra):
    d = results.run_dir(store, f"cpu/table1/{row}/seed{seed}")
    results.atomic_write_json(d / "config.json", {"experiment": "table1", "row": row,
                                                  "scale": "cpu", "seed": seed, "method": row,
                                                  "arch": "cnn-small", "dataset": "fashion-mnist",
                                                  "config_hash": f"{cell}-{seed}"})
    record = {"status": status, "clean_acc": clean, "pgd_acc": pgd, "train_minutes": 1.0,
              "train_flops": 2e12, "eval_n": 1000, "cell_hash": cell, **extra}
    results.atomic_write_json(d / "record.json", record)


def test_mean_and_std_over_seeds_and_not_run_rows(tmp_path):
    for seed, (c, p) in enumerate([(80.0, 50.0), (82.0, 54.0), (84.0, 52.0)]):
        _fake_run(tmp_path, "pgd_at", seed, c, p)
    _fake_run(tmp_path, "natural", 0, 90.0, 1.0, status="running")
    df = table_frame("table1", "cpu", tmp_path).set_index("row")
    assert df.loc["pgd_at", "clean_acc"] == pytest.approx(82.0)
    assert df.loc["pgd_at", "clean_std"] == pytest.approx(2.0)
    assert df.loc["pgd_at", "pgd_std"] == pytest.approx(2.0)
    assert df.loc["pgd_at", "n_seeds"] == 3 and df.loc["pgd_at", "cost_pflop"] == pytest.approx(2e-3)
    assert df.loc["natural", "status"] == "not run"            # running is not a result
    assert df.loc["aft", "status"] == "not run" and df.loc["aft", "paper_pgd"] == 51.7
    shown = display_frame(df.reset_index()).set_index("Method")
    assert shown.loc["PGD AT", "Clean"] == "82.00 ± 2.00" and shown.loc["AFT", "Clean"] == ""
    paths = write_table("table1", "cpu", tmp_path)
    assert "Scale: cpu" in paths["md"].read_text()


def test_failed_rows_show_as_failed(tmp_path):
    _fake_run(tmp_path, "fast_at", 0, None, None, status="failed", failed_epoch=4)
    df = table_frame("table1", "cpu", tmp_path).set_index("row")
    assert df.loc["fast_at", "status"] == "failed (epoch 4)"
    assert "clean_acc" not in df or df["clean_acc"].isna().all()


def test_runs_of_different_configs_are_never_mixed(tmp_path):
    _fake_run(tmp_path, "pgd_at", 0, 80.0, 50.0, cell="c1")
    _fake_run(tmp_path, "pgd_at", 1, 82.0, 52.0, cell="c2")
    with pytest.raises(ReproError, match="different configs"):
        table_frame("table1", "cpu", tmp_path)


def test_aa_and_checks_columns_over_seeds(tmp_path):
    for seed, (aa, checks) in enumerate([(44.0, "ok"), (46.0, "large_eps"), (48.0, "ok")]):
        _fake_run(tmp_path, "pgd_at", seed, 80.0, 50.0, aa_acc=aa, aa_n=200, checks=checks)
    for seed in range(2):
        _fake_run(tmp_path, "natural", seed, 90.0, 1.0, aa_acc=0.0, aa_n=200, checks="ok")
    _fake_run(tmp_path, "fast_at", 0, 80.0, 45.0)  # evaluated before AutoAttack and the checks
    paths = write_table("table1", "cpu", tmp_path)
    csv = pd.read_csv(paths["csv"]).set_index("row")
    assert csv.loc["pgd_at", "aa_acc"] == pytest.approx(46.0)
    assert csv.loc["pgd_at", "aa_std"] == pytest.approx(2.0)
    assert csv.loc["pgd_at", "n_seeds"] == 3 and csv.loc["natural", "n_seeds"] == 2
    assert csv.loc["pgd_at", "checks"] == "large_eps"   # one failed seed fails the cell
    assert csv.loc["natural", "checks"] == "ok"
    assert csv.loc["fast_at", "checks"] == "unchecked" and pd.isna(csv.loc["fast_at", "aa_acc"])
    shown = display_frame(table_frame("table1", "cpu", tmp_path)).set_index("Method")
    assert shown.loc["PGD AT †", "AA"] == "46.00 ± 2.00" and shown.loc["PGD AT †", "Seeds"] == 3
    assert shown.loc["Natural", "AA"] == "0.00 ± 0.00" and shown.loc["Natural", "Checks"] == "ok"
    assert shown.loc["Fast AT", "AA"] == "" and shown.loc["Fast AT", "Checks"] == "unchecked"
    md = paths["md"].read_text()
    assert "| AA " in md and "PGD AT †" in md and "† marks a row that failed" in md
    assert "standard AutoAttack (pyautoattack" in md and "on 200 of those images" in md
    assert "PGD AT †" in paths["tex"].read_text()


def test_aa_is_never_averaged_over_some_seeds_only(tmp_path):
    _fake_run(tmp_path, "pgd_at", 0, 80.0, 50.0, aa_acc=44.0, aa_n=200, checks="ok")
    _fake_run(tmp_path, "pgd_at", 1, 82.0, 52.0)
    df = table_frame("table1", "cpu", tmp_path).set_index("row")
    assert pd.isna(df.loc["pgd_at", "aa_acc"]) and df.loc["pgd_at", "checks"] == "unchecked"
