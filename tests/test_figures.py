"""report/figures.py: the cost–robustness figure, drawn from the store alone, byte-stable."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from paper_repro import results
from paper_repro.report.figures import pareto_figure, write_pareto
from paper_repro.report.tables import table_frame


def _fake_run(store, row, seed, pgd, aa, flops, pretrain_flops=None):
    d = results.run_dir(store, f"smoke/table1/{row}/seed{seed}")
    results.atomic_write_json(d / "config.json", {
        "experiment": "table1", "row": row, "scale": "smoke", "seed": seed,
        "method": "aft" if row.startswith("aft") else row, "arch": "cnn-small",
        "dataset": "fashion-mnist", "config_hash": f"{row}{seed}"})
    results.write_record(d, {"status": "done", "clean_acc": 80.0, "pgd_acc": pgd, "aa_acc": aa,
                             "aa_n": 50, "train_minutes": 1.0, "train_flops": flops,
                             "pretrain_flops": pretrain_flops, "eval_n": 100, "cell_hash": row})


def _store(tmp_path):
    _fake_run(tmp_path, "natural", 0, 1.0, 0.0, 2e12)
    _fake_run(tmp_path, "natural", 1, 3.0, 2.0, 2e12)
    _fake_run(tmp_path, "aft", 0, 50.0, 45.0, 1e12, pretrain_flops=3e12)
    _fake_run(tmp_path, "free_at", 0, 30.0, 25.0, 2e12)
    record = results.run_dir(tmp_path, "smoke/table1/free_at/seed0") / "record.json"
    record.write_text(record.read_text()[:40])  # torn: shown as unreadable, drawn nowhere


def _markers(ax, filled: bool) -> set[tuple[float, float]]:
    """(x, y) of the marker-only lines of an axis, filled or open."""
    return {(round(float(x), 6), float(y)) for line in ax.lines if line.get_marker() not in
            (None, "None", "") and line.get_linestyle() in ("None", "", " ")
            and (line.get_markerfacecolor() == "none") != filled for x, y in line.get_xydata()}


def test_pareto_puts_each_finished_row_at_its_cost_with_aft_linked_to_its_pretraining(tmp_path):
    _store(tmp_path)
    fig = pareto_figure("table1", table_frame("table1", "smoke", tmp_path), "smoke")
    ours_pgd, ours_aa, paper = fig.axes[:3]
    assert ours_pgd.get_xscale() == "log" and paper.get_xscale() == "log"
    bars = [c for c in ours_pgd.containers if isinstance(c, ErrorbarContainer)]
    points = {tuple(np.round(c.lines[0].get_xydata()[0], 6)): c for c in bars}
    assert set(points) == {(0.002, 2.0), (0.004, 50.0)}  # natural (mean of 2 seeds); AFT in all
    natural = points[(0.002, 2.0)].lines[2][0].get_segments()[0]  # its error bar: mean ± std
    assert np.allclose(natural[:, 1], [2.0 - np.sqrt(2), 2.0 + np.sqrt(2)])
    assert (0.001, 50.0) in _markers(ours_pgd, filled=False)  # AFT without its pre-training
    assert (0.001, 45.0) in _markers(ours_aa, filled=False)
    assert len(_markers(paper, filled=True)) == 8  # the paper's 8 rows at their reported times
    note = " ".join(t.get_text() for t in fig.texts)
    assert "Free AT (unreadable)" in note and "YOPO (not run)" in note
    plt.close(fig)


def test_the_pareto_files_are_byte_stable(tmp_path):
    _store(tmp_path)
    out = tmp_path / "figures" / "smoke"
    paths = write_pareto("smoke", tmp_path, out)
    assert sorted(p.name for p in paths) == ["pareto_table1.pdf", "pareto_table1.png"]
    first = {p: p.read_bytes() for p in paths}
    assert b"CreationDate" not in first[tmp_path / "figures/smoke/pareto_table1.pdf"]
    assert b"Software" not in first[tmp_path / "figures/smoke/pareto_table1.png"]
    write_pareto("smoke", tmp_path, out)
    assert {p: p.read_bytes() for p in paths} == first


@pytest.mark.parametrize("status", ["running", "failed"])
def test_no_pareto_without_a_finished_row(tmp_path, status):
    _fake_run(tmp_path, "natural", 0, 1.0, 0.0, 2e12)
    results.write_record(results.run_dir(tmp_path, "smoke/table1/natural/seed0"),
                         {"status": status, "failed_epoch": 1})
    assert pareto_figure("table1", table_frame("table1", "smoke", tmp_path), "smoke") is None
