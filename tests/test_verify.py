"""report/verify.py and `./reproduce.sh TABLE --fresh`: a re-run compared with the committed
store (or the paper at paper scale) by a stated prediction-interval rule with a binomial floor;
paired conclusions whose sign flips are flagged; --fresh never writes under results/ and reuses
the runs it has already done. Records are planted with the store's own writers."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from paper_repro import cli, results
from paper_repro.errors import ReproError
from paper_repro.report.verify import binomial_se, verify_frame, write_verify

REPO = Path(__file__).resolve().parents[1]
T975 = {1: 12.706204736174707, 2: 4.302652729911275}  # t(0.975, df)


def _plant(store, row, seed, *, scale="cpu", cpu="AMD EPYC", experiment="table1", **metrics):
    """One done run as the runner leaves it: config.json and record.json in its folder."""
    d = results.run_dir(store, f"{scale}/{experiment}/{row}/seed{seed}")
    results.atomic_write_json(d / "config.json", {
        "experiment": experiment, "row": row, "scale": scale, "seed": seed,
        "method": row, "arch": "mlp", "dataset": "fashion-mnist",
        "config_hash": f"{row}{seed}"})
    record = {"status": "done", "cell_hash": row, "eval_n": 1000, "aa_n": 200,
              "run_path": f"{scale}/{experiment}/{row}/seed{seed}", "train_flops": 1.0,
              "hardware": {"cpu": cpu, "cpu_count": 2, "torch_threads": 1}}
    results.write_record(d, {**record, **metrics})


def _cell(frame: pd.DataFrame, row: str, metric: str, kind: str = "row") -> pd.Series:
    found = frame[(frame["kind"] == kind) & (frame["row"] == row) & (frame["metric"] == metric)]
    assert len(found) == 1, (row, metric, kind)
    return found.iloc[0]


@pytest.fixture
def stores(tmp_path):
    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    for seed, pgd in enumerate([50.0, 52.0, 54.0]):  # mean 52, sd 2
        _plant(committed, "pgd_at", seed, clean_acc=80.0 + seed, pgd_acc=pgd, aa_acc=pgd - 1)
    return committed, fresh


def test_a_rerun_inside_the_interval_is_reproduced(stores):
    committed, fresh = stores
    _plant(fresh, "pgd_at", 0, cpu="Intel Xeon", clean_acc=81.0, pgd_acc=53.0, aa_acc=52.0)
    line = _cell(verify_frame("table1", "cpu", fresh, committed), "pgd_at", "PGD-20")
    half = T975[2] * 2.0 * math.sqrt(1 / 3 + 1 / 1)  # s = 2 is above the 1.58-point floor
    assert (line["n"], line["k"], line["ref_mean"], line["diff"]) == (3, 1, 52.0, 1.0)
    assert (line["pi_low"], line["pi_high"]) == pytest.approx((52 - half, 52 + half))
    assert line["verdict"] == "reproduced"


def test_a_rerun_shifted_by_many_standard_deviations_differs(stores):
    committed, fresh = stores
    for seed in range(2):  # k = 2 narrows the interval: √(1/3 + 1/2)
        _plant(fresh, "pgd_at", seed, clean_acc=81.0, pgd_acc=52.0 + 6 * 2.0, aa_acc=51.0)
    frame = verify_frame("table1", "cpu", fresh, committed)
    line = _cell(frame, "pgd_at", "PGD-20")
    assert line["pi_high"] == pytest.approx(52 + T975[2] * 2.0 * math.sqrt(1 / 3 + 1 / 2))
    assert line["verdict"] == "differs" and line["diff"] == pytest.approx(12.0)
    assert _cell(frame, "pgd_at", "AA")["verdict"] == "reproduced"  # 51.0 against 51 ± ...


def test_one_committed_seed_or_no_rerun_value_gives_no_verdict(tmp_path, stores):
    committed, fresh = stores
    _plant(committed, "aft", 0, clean_acc=74.0, pgd_acc=52.4, aa_acc=49.0)  # n = 1
    _plant(fresh, "aft", 0, clean_acc=74.2, pgd_acc=51.4, aa_acc=46.5)
    _plant(fresh, "pgd_at", 0, clean_acc=81.0, pgd_acc=52.0)  # k = 0 for AA: no aa_acc
    frame = verify_frame("table1", "cpu", fresh, committed)
    aft = _cell(frame, "aft", "PGD-20")
    assert aft["verdict"] == "no verdict" and "1 committed seed" in aft["why"]
    assert aft["diff"] == pytest.approx(-1.0)  # the difference is still shown
    aa = _cell(frame, "pgd_at", "AA")
    assert (aa["k"], aa["verdict"], aa["why"]) == (0, "no verdict", "no re-run seed")
    assert _cell(frame, "pgd_at", "PGD-20")["verdict"] == "reproduced"  # k = 1 is enough


def test_the_binomial_floor_keeps_identical_seeds_from_a_zero_width_interval(tmp_path):
    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    for seed in range(3):
        _plant(committed, "fast_at", seed, clean_acc=74.0, pgd_acc=52.0, aa_acc=50.0)
    _plant(fresh, "fast_at", 0, clean_acc=74.0, pgd_acc=54.0, aa_acc=45.0)
    frame = verify_frame("table1", "cpu", fresh, committed)
    pgd, aa = _cell(frame, "fast_at", "PGD-20"), _cell(frame, "fast_at", "AA")
    floor = 100 * math.sqrt(0.52 * 0.48 / 1000)  # eval_n = 1000 images
    assert pgd["s_used"] == pytest.approx(floor) and pgd["pi_high"] - pgd["pi_low"] > 10
    assert pgd["verdict"] == "reproduced"  # 2 points off: within ±7.9, not a 0-width interval
    assert aa["floor"] == pytest.approx(100 * math.sqrt(0.25 / 200))  # AA on aa_n = 200
    assert aa["verdict"] == "reproduced"  # 5 points off with 200 images: within ±14
    assert binomial_se(0.0, 1000) == pytest.approx(0.1, rel=1e-3)  # 0%: a floor (p ≥ 1/N)


def _pair(store, seed, aft, pgd_at, **kw):
    _plant(store, "aft", seed, clean_acc=74.0, pgd_acc=aft, **kw)
    _plant(store, "pgd_at", seed, clean_acc=80.0, pgd_acc=pgd_at, **kw)


def test_a_paired_difference_whose_sign_flips_is_flagged(tmp_path):
    committed, fresh, fresh_same = tmp_path / "c", tmp_path / "f", tmp_path / "g"
    for seed, aft in enumerate([56.0, 57.0, 58.0]):  # AFT − PGD AT = +6, +7, +8: CI above 0
        _pair(committed, seed, aft, 50.0)
    _pair(fresh, 0, 48.0, 53.0)  # −5: the conclusion's sign flips
    _pair(fresh_same, 0, 55.0, 51.0)  # +4: it holds
    flipped = _cell(verify_frame("table1", "cpu", fresh, committed), "aft", "PGD-20", "paired")
    assert flipped["baseline"] == "pgd_at" and flipped["sign"] == "FLIPPED"
    assert flipped["ref_mean"] == pytest.approx(7.0) and flipped["diff"] == pytest.approx(-12.0)
    held = _cell(verify_frame("table1", "cpu", fresh_same, committed), "aft", "PGD-20", "paired")
    assert held["sign"] == "holds"
    committed_spans_0 = tmp_path / "s"
    for seed, aft in enumerate([49.0, 50.0, 52.0]):  # −1, 0, +2: the CI spans 0, no claim
        _pair(committed_spans_0, seed, aft, 50.0)
    no_claim = _cell(verify_frame("table1", "cpu", fresh, committed_spans_0), "aft", "PGD-20",
                     "paired")
    assert no_claim["sign"] == "no claim (interval spans 0)"
    paths = write_verify("table1", "cpu", fresh, committed)
    assert "1 paired conclusion(s) flipped" in paths["md"].read_text()


def test_paper_scale_compares_with_the_papers_csv(tmp_path):
    fresh = tmp_path / "fresh"
    paper = pd.read_csv(REPO / "results" / "paper" / "table1.csv").set_index("row")
    for seed, (aft, pgd_at) in enumerate([(51.0, 60.0), (52.0, 61.0), (53.0, 62.0)]):
        _pair(fresh, seed, aft, pgd_at, scale="paper")
    _plant(fresh, "natural", 0, scale="paper", clean_acc=94.0, pgd_acc=0.0)
    frame = verify_frame("table1", "paper", fresh, tmp_path / "absent")  # no committed store
    aft = _cell(frame, "aft", "PGD-20")
    s = 100 * math.sqrt(0.52 * 0.48 / 1000)  # sd 1 is below the floor at p = 52%
    half = T975[2] * s * math.sqrt(1 + 1 / 3)
    assert (aft["reference"], aft["ref_mean"]) == ("paper", paper.loc["aft", "pgd"])
    assert (aft["pi_low"], aft["pi_high"]) == pytest.approx((52 - half, 52 + half))
    assert aft["verdict"] == "reproduced"  # 51.7 in [44.1, 59.9]
    assert _cell(frame, "pgd_at", "PGD-20")["verdict"] == "differs"  # 45.84 vs 61 ± 7.9
    natural = _cell(frame, "natural", "clean")
    assert natural["verdict"] == "no verdict" and "1 re-run seed" in natural["why"]
    assert natural["diff"] == pytest.approx(94.0 - paper.loc["natural", "clean"])
    assert _cell(frame, "aft", "clean")["verdict"] == "differs"  # 74 vs the paper's 88.15
    pair = _cell(frame, "aft", "PGD-20", "paired")  # paper +5.86, re-run −9 every seed
    assert pair["ref_mean"] == pytest.approx(paper.loc["aft", "pgd"] - paper.loc["pgd_at", "pgd"])
    assert pair["sign"] == "FLIPPED" and pair["verdict"] == "differs"


def test_verify_without_the_table_is_one_line_and_non_zero(tmp_path, capsys):
    committed = tmp_path / "committed"
    _plant(committed, "pgd_at", 0, clean_acc=80.0, pgd_acc=50.0)
    other = tmp_path / "other"  # a store with runs of another table only
    _plant(other, "natural_wrn32", 0, experiment="table2", clean_acc=80.0, pgd_acc=1.0)
    for store in (other, tmp_path / "absent"):
        code = cli.main(["verify", "table1", "--scale", "cpu", "--results-dir", str(store),
                         "--against", str(committed)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: verify:"), err
    assert not (tmp_path / "absent").exists()  # nothing created
    _plant(other, "pgd_at", 0, scale="smoke", clean_acc=80.0, pgd_acc=50.0)
    with pytest.raises(ReproError, match="holds no smoke-scale runs of table1"):
        verify_frame("table1", "smoke", other, committed)


def test_verify_writes_the_report_and_shows_both_machines(stores, capsys):
    committed, fresh = stores
    _plant(fresh, "pgd_at", 0, cpu="Intel Xeon", clean_acc=81.0, pgd_acc=80.0, aa_acc=52.0)
    code = cli.main(["verify", "table1", "--scale", "cpu", "--results-dir", str(fresh),
                     "--against", str(committed)])
    assert code == 0  # a report: exit 0 although a cell differs
    md = (fresh / "verify" / "cpu" / "table1.md").read_text()
    assert md in capsys.readouterr().out
    assert "committed AMD EPYC (1 thread) × 3 runs; re-run Intel Xeon (1 thread) × 1 run" in md
    csv = pd.read_csv(fresh / "verify" / "cpu" / "table1.csv")
    assert set(csv["verdict"]) == {"reproduced", "differs"}
    assert "Not re-run (not compared): natural" in md


# --- ./reproduce.sh TABLE --fresh ----------------------------------------------------------

def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REPRO_VENV": sys.prefix, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(REPO / "reproduce.sh"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)


def test_fresh_refuses_the_committed_store_in_one_line():
    for target in ("results", "./results/", "results/fresh"):
        # an unknown row: were the refusal missing, the sweep would stop before training
        done = _reproduce("table1", "--fresh", "--scale", "smoke", "--rows", "no_such_row",
                          "--results-dir", target)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "never writes into the committed store" in done.stderr


@pytest.mark.timeout(600)
def test_fresh_writes_nothing_under_results_and_reuses_done_runs(tmp_path):
    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    for seed in range(2):  # smoke-scale "committed" runs to compare with
        _plant(committed, "natural", seed, scale="smoke", clean_acc=60.0 + seed, pgd_acc=0.0)
    before = _tree_hash(REPO / "results")
    args = ("table1", "--fresh", "--scale", "smoke", "--rows", "natural", "--results-dir",
            str(fresh), "--against", str(committed))
    first = _reproduce(*args, "--seeds", "1")  # as if stopped after its first run
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    seed0 = results.run_dir(fresh, "smoke/table1/natural/seed0") / "record.json"
    record = seed0.read_bytes()
    assert "Did it reproduce? Table 1" in first.stdout
    second = _reproduce(*args, "--seeds", "2")  # the same command, resumed with one more seed
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert seed0.read_bytes() == record  # done: reused, not trained again
    assert json.loads((seed0.parent.parent / "seed1" / "record.json").read_text())[
        "status"] == "done"
    verdict = pd.read_csv(fresh / "verify" / "smoke" / "table1.csv")
    assert set(verdict["k"]) == {2}
    assert _tree_hash(REPO / "results") == before


def test_the_committed_example_verdict_matches_the_committed_records():
    """results/verify/cpu/table1.{md,csv}: the reviewer's check as it ran here (README), every
    Table 1 row and metric, its committed side the committed records' means."""
    example = pd.read_csv(REPO / "results" / "verify" / "cpu" / "table1.csv")
    rows = example[example["kind"] == "row"]
    assert {"natural", "pgd_at", "pgd_at_es", "aft", "aft_500k"} <= set(rows["row"])
    assert set(rows["metric"]) == {"clean", "PGD-20", "AA"}
    frame = results.load(REPO / "results", scale="cpu")
    frame = frame[frame["experiment"] == "table1"]
    keys = {"clean": "clean_acc", "PGD-20": "pgd_acc", "AA": "aa_acc"}
    for _, line in rows[rows["row"] != "pgd_at_es"].iterrows():
        runs = frame[frame["row"] == line["row"]]
        assert line["n"] == len(runs)
        assert math.isclose(line["ref_mean"], runs[keys[line["metric"]]].mean(), abs_tol=1e-9)
    assert (REPO / "results" / "verify" / "cpu" / "table1.md").read_text().count("reproduced") > 0
