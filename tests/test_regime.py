"""report/regime.py and experiments/regime.toml: the regime search measures gap, fall and peak
epoch from a run's curves as documented, applies the stated criterion, names the cheapest
setting that meets it, and `aggregate` renders its table and figure from the store alone."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from paper_repro import cli, results
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from paper_repro.errors import ConfigError
from paper_repro.report import regime
from paper_repro.report.regime import Criterion

# Planted curves (10 epochs). By hand:
#   window 1: end test 41, end train 95 -> gap 54; peak 50 at epoch 5 -> fall 9.
#   window 3: trailing means of test: e3 20, e4 30, e5 40, e6 45, e7 46.33, e8 44, e9 43, e10 42;
#             peak 46.33 (window e5-e7, middle epoch 6), end 42 -> fall 4.33;
#             end train (80 + 90 + 95) / 3 = 88.33 -> gap 46.33.
TEST_PGD = [10, 20, 30, 40, 50, 45, 44, 43, 42, 41]
TRAIN_PGD = [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]


def _metrics(test=TEST_PGD, train=TRAIN_PGD) -> pd.DataFrame:
    epochs = range(1, len(test) + 1)
    return pd.DataFrame({"epoch": list(epochs), "lr": [0.1] * len(test),
                         "test_clean_acc": [t + 20 for t in test],
                         "test_pgd_acc": test, "train_pgd_acc": train})


@pytest.mark.parametrize("window, gap, fall, peak_epoch, peak", [
    (1, 54.0, 9.0, 5, 50.0),
    (3, 88 + 1 / 3 - 42, 46 + 1 / 3 - 42, 6, 46 + 1 / 3),
])
def test_gap_fall_and_peak_epoch_match_hand_computed_values(window, gap, fall, peak_epoch, peak):
    m = regime.regime_metrics(_metrics(), window)
    assert m.gap_pp == pytest.approx(gap)
    assert m.fall_pp == pytest.approx(fall)
    assert m.peak_epoch == peak_epoch
    assert m.peak_test_pgd == pytest.approx(peak)
    assert m.epochs == 10


def test_a_run_without_curves_is_a_one_line_error():
    with pytest.raises(ConfigError, match="monitor_n > 0") as info:
        regime.regime_metrics(_metrics().drop(columns=["train_pgd_acc"]), 5)
    assert "\n" not in str(info.value)


def _plant(store: Path, row: str, *, n: int, gap: float, falls: bool, minutes: float) -> Path:
    """A finished smoke regime run of 20 epochs: test PGD rises to 60 at epoch 8, then falls to
    50 (or stays at 60); train PGD ends `gap` points above test."""
    test = [30 + 30 * min(e, 8) / 8 - (10 * max(e - 8, 0) / 12 if falls else 0)
            for e in range(1, 21)]
    train = [t + gap * e / 20 for e, t in enumerate(test, start=1)]
    d = results.run_dir(store, f"smoke/regime/{row}/seed0")
    results.atomic_write_json(d / "config.json", {
        "experiment": "regime", "row": row, "scale": "smoke", "seed": 0, "method": "pgd_at",
        "arch": "mlp", "dataset": "fashion-mnist", "config_hash": row, "train_subset": n,
        "epochs": 20})
    results.write_metrics(d / "metrics.csv", _metrics(test, train).to_dict("records"))
    results.atomic_write_json(d / "record.json", {
        "status": "done", "cell_hash": row, "clean_acc": 80.0, "pgd_acc": 50.0,
        "train_minutes": minutes, "epochs_done": 20})
    return d


@pytest.fixture
def planted(tmp_path):
    """Four settings against the stated criterion (gap >= 15, fall >= 2, <= 15 min, window 5)."""
    _plant(tmp_path, "cnn16-1k", n=1000, gap=2, falls=True, minutes=1.0)     # no gap
    _plant(tmp_path, "mlp512-1k", n=1000, gap=30, falls=False, minutes=1.5)  # no fall
    _plant(tmp_path, "mlp1024-1k", n=1000, gap=30, falls=True, minutes=3.0)  # meets
    _plant(tmp_path, "mlp1024-2k", n=2000, gap=30, falls=True, minutes=2.0)  # meets, cheaper
    _plant(tmp_path, "mlp1024-5k", n=5000, gap=30, falls=True, minutes=20.0)  # too slow
    return tmp_path


def test_the_criterion_picks_the_cheapest_setting_that_meets_it(planted):
    frame = regime.regime_frame("smoke", planted).set_index("row")
    assert frame.loc["cnn16-1k", "meets"] == "no: gap"
    assert frame.loc["mlp512-1k", "meets"] == "no: fall"
    assert frame.loc["mlp1024-1k", "meets"] == "yes"
    assert frame.loc["mlp1024-2k", "meets"] == "yes"
    assert frame.loc["mlp1024-5k", "meets"] == "no: time"
    assert frame.loc["cnn32-1k", "status"] == "not run"
    assert regime.chosen(frame.reset_index())["row"] == "mlp1024-2k"
    assert "mlp 784-1024-1024-10 on 2,000 images" in regime.verdict(frame.reset_index())
    settings = len(load_experiment("regime").rows)
    assert f"(5 of {settings} settings measured)" in regime.verdict(frame.reset_index())
    strict = Criterion(min_gap_pp=15, min_fall_pp=50, max_train_minutes=15, window=5)
    none = regime.regime_frame("smoke", planted, strict)
    assert regime.chosen(none) is None and "none meets it" in regime.verdict(none)


def test_check_run_applies_the_criterion_to_one_run_folder(planted):
    check = regime.check_run(results.run_dir(planted, "smoke/regime/mlp1024-1k/seed0"))
    assert check.meets and check.train_minutes == 3.0 and check.metrics.gap_pp > 15
    slow = regime.check_run(results.run_dir(planted, "smoke/regime/mlp1024-5k/seed0"))
    assert slow.failed == ("time",)


def test_the_stated_criterion_is_read_from_regime_toml(tmp_path):
    c = regime.load_criterion()
    assert (c.min_gap_pp, c.min_fall_pp, c.max_train_minutes, c.window) == (15, 2, 15, 5)
    bad = tmp_path / "bad.toml"
    bad.write_text("[criterion]\nmin_gap_pp = 15\nwindow = 0\n")
    with pytest.raises(ConfigError, match="needs min_gap_pp") as info:
        regime.load_criterion(bad)
    assert "\n" not in str(info.value)
    bad.write_text("[criterion]\nmin_gap_pp = 15\nmin_fall_pp = 2\nmax_train_minutes = 9\n"
                   "window = 0\n")
    with pytest.raises(ConfigError, match="window must be >= 1"):
        regime.load_criterion(bad)


def test_cpu_rows_are_pgd_at_over_capacity_by_size_with_per_epoch_curves():
    exp = load_experiment("regime")
    grid = set()
    for row in exp.row_ids:
        cfg = resolve_row(exp, row, "cpu")
        assert (cfg.method, cfg.eps, cfg.monitor_n, cfg.monitor_steps) == ("pgd_at", 0.1, 1000, 10)
        assert cfg.aa_n == 0 and not cfg.eval_checks
        assert cfg.schedule_args["milestones"] == [0.5, 0.75]
        grid.add((cfg.arch, tuple(sorted(cfg.model_args.items())), cfg.train_subset))
    archs = {(a, m) for a, m, _ in grid}
    assert len(archs) >= 4 and {"cnn-small", "mlp"} <= {a for a, _ in archs}
    assert grid == {(a, m, n) for a, m in archs for n in (1000, 2000, 5000)}  # the full grid


def test_aggregate_renders_the_regime_table_and_figure_from_a_smoke_sweep(tmp_path, capsys):
    store = tmp_path / "results"
    argv = ["sweep", "regime", "--scale", "smoke", "--rows", "mlp512-1k,cnn16-1k",
            "--results-dir", str(store)]
    assert cli.main(argv) == 0
    table = store / "tables" / "smoke" / "regime.md"
    files = [table, table.with_suffix(".csv"), store / "figures" / "smoke" / "regime.png",
             store / "figures" / "smoke" / "regime.pdf"]
    first = {p: p.read_bytes() for p in files}
    for p in files:
        p.unlink()
    assert cli.main(["aggregate", "--scale", "smoke", "--results-dir", str(store)]) == 0
    assert {p: p.read_bytes() for p in files} == first  # from the store alone, byte-stable
    frame = pd.read_csv(table.with_suffix(".csv")).set_index("row")
    assert list(frame.loc[["mlp512-1k", "cnn16-1k"], "status"]) == ["done", "done"]
    assert frame.loc["mlp512-1k", "epochs"] == 3 and frame["gap_pp"].notna().sum() == 2
    md = table.read_text()
    assert "Criterion: PGD train − test gap ≥ 15 pp" in md and "Chosen stand-in:" in md
