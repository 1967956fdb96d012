"""The commands a user types: the smoke Table 1 end to end, aggregate, and one-line errors."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from paper_repro import cli
from paper_repro.experiment import load_experiment

REPO = Path(__file__).resolve().parent.parent
ROWS = load_experiment("table1").row_ids  # the experiment file's rows, in its order
# the paper's rows (results/paper/table1.csv); the early-stopped and the tuned rows are beyond
# the paper: no paper numbers
PAPER_ROWS = [r for r in ROWS
              if r in set(pd.read_csv(REPO / "results" / "paper" / "table1.csv")["row"])]


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    assert cli.main(["sweep", "table1", "--scale", "smoke", "--results-dir", str(store)]) == 0
    return store


def test_smoke_table1_has_every_row_measured(smoke_store):
    table = pd.read_csv(smoke_store / "tables" / "smoke" / "table1.csv")
    assert list(table["row"]) == ROWS
    assert (table["status"] == "done").all()
    for col in ("row", "method", "arch", "dataset", "scale", "clean_acc", "pgd_acc", "checks",
                "val_pgd_acc", "train_minutes", "cost_pflop"):
        assert table[col].notna().all(), col
    by_row = table.set_index("row")
    assert {"natural", "pgd_at", "aft"} <= set(PAPER_ROWS) and \
        {"pgd_at_es", "aft_tuned"}.isdisjoint(PAPER_ROWS)
    for col in ("paper_clean", "paper_pgd", "paper_minutes"):
        assert by_row.loc[PAPER_ROWS, col].notna().all()
        assert by_row.loc[[r for r in ROWS if r not in PAPER_ROWS], col].isna().all()
    assert by_row.loc["pgd_at_es", "best_epoch"] == 1  # one epoch at smoke scale
    assert table.set_index("row").loc["pgd_at", "paper_minutes"] == 5418
    aft = table.set_index("row").loc["aft"]
    assert aft["pretrain_minutes"] >= 0 and aft["pretrain_pflop"] > 0
    assert pd.isna(table.set_index("row").loc["natural", "pretrain_minutes"])
    md = (smoke_store / "tables" / "smoke" / "table1.md").read_text()
    assert "PGD-20 with α = ε/4" in md and "95.01" in md
    assert (smoke_store / "tables" / "smoke" / "table1.tex").read_text().startswith("\\begin{tabular}")


def test_aggregate_rebuilds_the_same_table_without_training(smoke_store):
    csv = smoke_store / "tables" / "smoke" / "table1.csv"
    before = csv.read_text()
    csv.unlink()
    records = sorted(p.stat().st_mtime_ns for p in (smoke_store / "runs").glob("**/record.json"))
    assert cli.main(["aggregate", "--scale", "smoke", "--results-dir", str(smoke_store)]) == 0
    assert csv.read_text() == before
    assert sorted(p.stat().st_mtime_ns for p in (smoke_store / "runs").glob("**/record.json")) \
        == records
    assert (smoke_store / "figures" / "smoke" / "fig5.png").stat().st_size > 0
    assert (smoke_store / "figures" / "smoke" / "fig1.pdf").stat().st_size > 0


def test_the_committed_cpu_tables_are_what_the_committed_records_give(tmp_path):
    """`aggregate` on a copy of the committed store (records, no checkpoints) rebuilds every
    committed cpu table and figure byte for byte (the cost-robustness figures included),
    without training or evaluating."""
    committed = REPO / "results"
    store = tmp_path / "results"
    shutil.copytree(committed, store, ignore=shutil.ignore_patterns("*.pt"))  # as in git
    tables = sorted(p.relative_to(store) for p in (store / "tables" / "cpu").iterdir())
    assert {p.stem for p in tables} >= {"table1", "table2", "table3"}
    figures = sorted(p.relative_to(store) for p in (store / "figures" / "cpu").glob("*.p[nd][gf]"))
    assert {p.stem for p in figures} >= {"fig1", "fig3", "fig4", "fig5", "pareto_table1",
                                         "pareto_table2", "pareto_table3"}
    shutil.rmtree(store / "tables")
    for figure in figures:
        (store / figure).unlink()  # fig3_points.csv stays: Fig 3's points without the checkpoints
    records = {p: p.read_bytes() for p in (store / "runs").glob("**/record.json")}
    assert cli.main(["aggregate", "--scale", "cpu", "--results-dir", str(store)]) == 0
    for path in tables:
        assert (store / path).read_text() == (committed / path).read_text(), path
    for path in figures:  # byte-stable: no dates or versions in the files
        assert (store / path).read_bytes() == (committed / path).read_bytes(), path
    assert {p: p.read_bytes() for p in records} == records


def test_rerunning_the_sweep_trains_nothing(smoke_store, capsys):
    records = {p: p.stat().st_mtime_ns for p in (smoke_store / "runs").glob("**/record.json")}
    assert cli.main(["sweep", "table1", "--scale", "smoke", "--results-dir", str(smoke_store)]) == 0
    assert {p: p.stat().st_mtime_ns for p in records} == records


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "no_such_method"], "unknown method 'no_such_method'"),
    (["run", "--arch", "vit-huge", "--max-steps", "1"], "unknown model 'vit-huge'"),
    (["run", "--epochs", "0"], "epochs must be >= 1"),
    (["run", "--eps", "-1"], "eps must be in"),
    (["run", "--set", "colour=blue"], "unknown config key 'colour'"),
    (["run", "--experiment", "table1", "--row", "nope"], "has no row 'nope'"),
    (["sweep", "table7"], "no experiment file 'table7'"),
    (["finetune"], "finetune needs --init"),
    (["finetune", "--init", "hub:resnet"], "unknown prefix 'hub:'"),
    (["run", "--dataset", "mnist-color"], "unknown dataset"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, argv, message):
    store = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "paper_repro", *argv, "--results-dir", str(store)]
                          if argv[0] != "sweep" else [sys.executable, "-m", "paper_repro", *argv],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_help_lists_the_subcommands():
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for sub in ("run", "finetune", "sweep", "table", "aggregate", "export"):
        assert sub in proc.stdout


def test_list_names_every_registry_and_the_init_forms(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("aft", "atta", "preact-resnet18", "fashion-mnist", "imagenet", "table3", "fig4",
                 "torchvision:<name>", "timm:<name>", "run:<run-path>"):
        assert name in out, name


def test_every_subcommand_has_a_handler_and_every_handler_a_subcommand():
    """The parser (cli/parser.py) and the dispatch table (cli.COMMANDS) name the same verbs."""
    import argparse

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(cli.COMMANDS)
    assert {"run", "sweep", "table", "aggregate", "verify", "bench", "gpucheck"} <= \
        set(cli.COMMANDS)
