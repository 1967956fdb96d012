"""Tables 2-3 and Figures 1/4: the experiment files resolve as documented, and fig4 and the
paper's time unit render from the store alone."""
from __future__ import annotations

import pytest

from paper_repro import results
from paper_repro.cli import main
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from paper_repro.errors import ConfigError
from paper_repro.report.figures import write_figures
from paper_repro.report.tables import display_frame, table_frame
from paper_repro.training.pipeline import pretrain_config


def _resolve(name, row, scale):
    exp = load_experiment(name)
    return resolve_row(exp, row, scale)


@pytest.mark.parametrize("name", ["table2", "table3", "fig1", "fig4"])
@pytest.mark.parametrize("scale", ["paper", "cpu", "smoke"])
def test_every_row_resolves_or_says_why_not(name, scale):
    exp = load_experiment(name)
    for row in exp.row_ids:
        if row == "atta" and name == "table3" and scale == "paper":
            with pytest.raises(ConfigError, match="not supported at scale paper"):
                _resolve(name, row, scale)
            continue
        cfg = _resolve(name, row, scale)
        assert cfg.dataset == {"paper": exp.scales["paper"]["dataset"]}.get(scale, "fashion-mnist")


def test_table2_aft_rows_share_one_pretraining_and_differ_in_training_eps():
    for scale in ("paper", "cpu"):
        eps8, eps10 = _resolve("table2", "aft_eps8", scale), _resolve("table2", "aft_eps10", scale)
        assert eps8.eps == eps10.eps                       # both evaluated at the table's ε
        assert eps10.train_eps == pytest.approx(eps8.eps * 10 / 8)
        assert pretrain_config(eps8).config_hash() == pretrain_config(eps10).config_hash()


def test_table3_paper_rows_start_from_the_public_models():
    assert _resolve("table3", "aft", "paper").init == "torchvision:resnet50:IMAGENET1K_V1"
    assert _resolve("table3", "aft_swsl", "paper").init == "timm:resnet50.fb_swsl_ig1b_ft_in1k"
    natural = _resolve("table3", "natural", "paper")
    assert natural.epochs == 0 and natural.init  # evaluated, not trained
    cpu = _resolve("table3", "aft_swsl", "cpu")
    assert cpu.pretrain["extra_data"] == "pseudo-label" and cpu.init is None


def test_fig4_rows_reuse_table1_pretraining_and_halve_plateaus_at_cpu():
    table1 = pretrain_config(_resolve("table1", "aft", "cpu")).config_hash()
    plateaus = {"paper": [], "cpu": []}
    for row in load_experiment("fig4").row_ids:
        for scale in plateaus:
            cfg = _resolve("fig4", row, scale)
            assert cfg.schedule == "step_lr"
            plateaus[scale].append(cfg.schedule_args["plateau"] / cfg.epochs)
        assert pretrain_config(_resolve("fig4", row, "cpu")).config_hash() == table1
    assert plateaus["paper"] == pytest.approx(plateaus["cpu"])  # the same fractions of the run
    assert len(set(plateaus["cpu"])) == 6


def test_epochs_zero_only_to_evaluate_a_pretrained_model(capsys):
    assert main(["run", "--method", "natural", "--set", "epochs=0"]) == 2
    assert "0 only with init" in capsys.readouterr().err


def _fake_fig4_run(store, row, plateau):
    d = results.run_dir(store, f"cpu/fig4/{row}/seed0")
    results.atomic_write_json(d / "config.json", {
        "experiment": "fig4", "row": row, "scale": "cpu", "seed": 0, "method": "aft",
        "arch": "cnn-small", "dataset": "fashion-mnist", "config_hash": row,
        "schedule_args": {"plateau": plateau, "gamma": 0.5}})
    results.write_metrics(d / "metrics.csv", [
        {"epoch": e, "lr": 0.5 ** e, "train_pgd_acc": 40 + e, "test_clean_acc": 70 + e,
         "test_pgd_acc": 45 - e} for e in (1, 2, 3)])
    results.atomic_write_json(d / "record.json", {"status": "done", "cell_hash": row})


def test_fig4_draws_one_curve_per_plateau_from_the_store(tmp_path):
    for row, plateau in [("i1", 0.5), ("i2", 1), ("i12", 6)]:
        _fake_fig4_run(tmp_path, row, plateau)
    paths = write_figures("cpu", tmp_path)
    assert {p.name for p in paths} >= {"fig4.png", "fig4.pdf"}
    assert (tmp_path / "figures/cpu/fig4.png").stat().st_size > 10_000


def test_table3_times_are_shown_in_hours_and_unsupported_rows_say_so(tmp_path):
    d = results.run_dir(tmp_path, "paper/table3/aft/seed0")
    results.atomic_write_json(d / "config.json", {
        "experiment": "table3", "row": "aft", "scale": "paper", "seed": 0, "method": "aft",
        "arch": "resnet50", "dataset": "imagenet", "config_hash": "h"})
    results.atomic_write_json(d / "record.json", {
        "status": "done", "clean_acc": 70.0, "pgd_acc": 40.0, "train_minutes": 90.0,
        "train_flops": 1e18, "eval_n": 10000, "cell_hash": "h"})
    df = table_frame("table3", "paper", tmp_path)
    shown = display_frame(df, load_experiment("table3").time_unit).set_index("Method")
    assert shown.loc["AFT", "Time (h)"] == "1.500"
    assert df.set_index("row").loc["atta", "status"] == "not supported"
    assert df.set_index("row").loc["aft", "diff_pgd"] == pytest.approx(40.0 - 43.0)
