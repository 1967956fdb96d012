"""results.py: a store that degrades gracefully — one unreadable run is reported, shown as
unreadable, and changes no other cell; records carry a schema version."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from paper_repro import cli, results
from paper_repro.training import pipeline
from paper_repro.training import runner
from paper_repro.experiment import load_experiment
from paper_repro.report.tables import table_frame
from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent
ROWS = ("natural", "free_at", "fast_at")  # rows whose fake runs no figure needs curves of


def _fake_store(store: Path) -> None:
    """Done smoke-scale Table 1 runs (two seeds of natural), as the runner writes them."""
    for row, seed, clean, pgd in (("natural", 0, 90.0, 1.0), ("natural", 1, 92.0, 3.0),
                                  ("free_at", 0, 80.0, 40.0), ("fast_at", 0, 78.0, 45.0)):
        d = results.run_dir(store, f"smoke/table1/{row}/seed{seed}")
        results.atomic_write_json(d / "config.json", {
            "experiment": "table1", "row": row, "scale": "smoke", "seed": seed, "method": row,
            "arch": "cnn-small", "dataset": "fashion-mnist", "config_hash": f"{row}{seed}"})
        results.write_record(d, {"status": "done", "clean_acc": clean, "pgd_acc": pgd,
                                 "train_minutes": 1.0, "train_flops": 2e12, "eval_n": 100,
                                 "cell_hash": row, "run_path": f"smoke/table1/{row}/seed{seed}"})


def _record(store: Path, run: str) -> Path:
    return results.run_dir(store, run) / "record.json"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _future(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": 99}))


def _aggregate(store: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    rc = cli.main(["aggregate", "--scale", "smoke", "--results-dir", str(store), *extra])
    return rc, capsys.readouterr().err.strip().splitlines()


def _csv(store: Path) -> pd.DataFrame:
    return pd.read_csv(store / "tables" / "smoke" / "table1.csv").set_index("row")


def _lines_but(store: Path, row: str) -> list[str]:
    """table1.csv's text, every line but `row`'s."""
    text = (store / "tables" / "smoke" / "table1.csv").read_text()
    return [line for line in text.splitlines() if not line.startswith(f"{row},")]


@pytest.mark.parametrize("damage, reason", [(_truncate, "unreadable JSON"),
                                            (_future, "has schema 99, newer than this code reads")])
def test_one_unreadable_record_is_one_warning_and_one_unreadable_cell(tmp_path, capsys, damage,
                                                                      reason):
    _fake_store(tmp_path)
    assert _aggregate(tmp_path, capsys) == (0, [])
    before = _lines_but(tmp_path, "free_at")
    damaged = _record(tmp_path, "smoke/table1/free_at/seed0")
    damage(damaged)
    rc, err = _aggregate(tmp_path, capsys)
    assert rc == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: {damaged}: {reason}")
    assert "remove the run's folder and run it again" in err[0] or "git pull" in err[0]
    after = _csv(tmp_path)
    assert after.loc["free_at", "status"] == "unreadable"
    assert after.loc["free_at", ["clean_acc", "pgd_acc", "cost_pflop"]].isna().all()
    assert _lines_but(tmp_path, "free_at") == before  # no other cell moved, byte for byte
    assert "| unreadable" in (tmp_path / "tables" / "smoke" / "table1.md").read_text()
    rc, err = _aggregate(tmp_path, capsys, "--strict")
    assert rc == 2 and err[0].startswith("warning: ") and err[-1].startswith("error: --strict")


def test_a_seed_that_cannot_be_read_blanks_its_cell_rather_than_averaging_the_rest(tmp_path):
    _fake_store(tmp_path)
    (results.run_dir(tmp_path, "smoke/table1/natural/seed1") / "config.json").write_text("{")
    cells = table_frame("table1", "smoke", tmp_path).set_index("row")
    assert cells.loc["natural", "status"] == "unreadable" and pd.isna(cells.loc["natural",
                                                                                "clean_acc"])
    assert cells.loc["fast_at", "clean_acc"] == 78.0


def test_an_empty_run_folder_changes_nothing(tmp_path, capsys):
    _fake_store(tmp_path)
    assert _aggregate(tmp_path, capsys) == (0, [])
    before = {p.name: p.read_bytes() for p in (tmp_path / "tables" / "smoke").iterdir()}
    results.run_dir(tmp_path, "smoke/table1/free_at/seed1").mkdir(parents=True)  # beside a run
    results.run_dir(tmp_path, "smoke/table1/yopo/seed0").mkdir(parents=True)     # a row's only
    assert _aggregate(tmp_path, capsys) == (0, [])
    assert {p.name: p.read_bytes() for p in (tmp_path / "tables" / "smoke").iterdir()} == before


def test_aggregate_fails_only_when_nothing_renders(tmp_path, capsys):
    rc, err = _aggregate(tmp_path, capsys)  # an empty store
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: nothing to render")
    _fake_store(tmp_path)
    for row, seed in (("natural", 0), ("natural", 1), ("free_at", 0), ("fast_at", 0)):
        _truncate(_record(tmp_path, f"smoke/table1/{row}/seed{seed}"))
    rc, err = _aggregate(tmp_path, capsys)
    assert rc == 2 and len(err) == 5 and err[-1].startswith("error: nothing to render")
    assert not (tmp_path / "tables").exists()


def test_table_and_status_list_the_unreadable_run(tmp_path, capsys):
    _fake_store(tmp_path)
    bad = _record(tmp_path, "smoke/table1/free_at/seed0")
    _truncate(bad)
    assert cli.main(["table", "table1", "--scale", "smoke", "--results-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {bad}: unreadable JSON")
    assert "unreadable" in captured.out
    argv = ["status", "table1", "--rows", ",".join(ROWS), "--scale", "smoke",
            "--results-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    lines = {ln.split()[0]: ln for ln in captured.out.splitlines() if "smoke/table1/" in ln}
    assert "unreadable" in lines["smoke/table1/free_at/seed0"]
    for run in ("smoke/table1/natural/seed0", "smoke/table1/fast_at/seed0"):
        assert "done" in lines[run]
    assert len(captured.err.strip().splitlines()) == 1 and str(bad) in captured.err


def test_status_names_an_unreadable_pretraining_and_the_run_that_needs_it(tmp_path, capsys):
    from paper_repro.experiment import load_experiment
    from paper_repro.training.methods import resolve_row

    cfg = resolve_row(load_experiment("table1"), "aft", "smoke")
    pre = pipeline.pretrain_config(cfg)
    pre_dir = results.run_dir(tmp_path, results.pretrain_path("smoke", pre.config_hash()))
    results.write_record(pre_dir, {"status": "done"})
    _future(pre_dir / "record.json")
    _fake_store(tmp_path)
    assert cli.main(["status", "table1", "--rows", "natural,aft", "--scale", "smoke",
                     "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"smoke/pretrain/{pre.config_hash()}" in out and "unreadable" in out
    assert any("smoke/table1/aft/seed0" in ln and "unknown" in ln for ln in out.splitlines())
    assert any("smoke/table1/natural/seed0" in ln and "done" in ln for ln in out.splitlines())


def test_records_carry_the_schema_and_legacy_records_read_as_schema_1(tmp_path):
    results.write_record(tmp_path, {"status": "done"})
    assert json.loads((tmp_path / "record.json").read_text())["schema"] == results.RECORD_SCHEMA
    (tmp_path / "record.json").write_text('{"status": "done"}')  # written before the field
    assert results.read_record(tmp_path) == {"status": "done"}
    _future(tmp_path / "record.json")
    with pytest.raises(results.UnreadableRunError, match="schema 99"):
        results.read_record(tmp_path)


def test_the_runner_never_trains_over_a_record_it_cannot_read(tmp_path):
    cfg = tiny_config(tmp_path)
    directory = results.run_dir(tmp_path, cfg.run_path)
    results.write_record(directory, {"status": "done", "clean_acc": 50.0})
    _future(directory / "record.json")
    before = (directory / "record.json").read_bytes()
    with pytest.raises(results.UnreadableRunError, match="schema 99"):
        runner.train_run(cfg, quiet=True)
    assert (directory / "record.json").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["record.json"]


@pytest.fixture(scope="module")
def committed_cells(tmp_path_factory):
    """Every cell of the committed cpu Tables 1-3, from a copy of the committed store."""
    store = tmp_path_factory.mktemp("committed") / "results"
    shutil.copytree(REPO / "results" / "runs", store / "runs",
                    ignore=shutil.ignore_patterns("*.pt"))
    return store, {t: table_frame(t, "cpu", store) for t in ("table1", "table2", "table3")}


@pytest.mark.parametrize("table, row, damage", [
    ("table1", "aft", lambda d: _truncate(d / "record.json")),
    ("table2", "free_at", lambda d: _future(d / "record.json")),
    ("table3", "natural", lambda d: (d / "config.json").write_text("not json")),
    ("table1", "pgd_at", lambda d: (d / "record.json").write_text("[]")),
])
def test_a_corrupt_committed_record_never_changes_any_other_cell(committed_cells, tmp_path,
                                                                 table, row, damage):
    source, clean = committed_cells
    store = tmp_path / "results"
    shutil.copytree(source, store)
    damage(results.run_dir(store, f"cpu/{table}/{row}/seed0"))
    frame = results.load(store, scale="cpu")
    assert results.problems(frame) and len(results.problems(frame)) == 1
    for name, before in clean.items():
        after = table_frame(name, "cpu", store)
        # the damaged run's cells: its row, and any view of it (PGD AT early stop shows pgd_at's)
        hit = (after["row"].map(load_experiment(name).source_row) == row) if name == table \
            else pd.Series(False, index=after.index)
        assert after[~hit].equals(before[~hit]), name
        if name == table:
            assert after.loc[hit, "status"].tolist() == ["unreadable"] * int(hit.sum())
            assert after.loc[hit, ["clean_acc", "pgd_acc", "aa_acc"]].isna().all(axis=None)
