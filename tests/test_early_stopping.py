"""Early stopping on the validation split: best.pt is the epoch with the highest validation PGD
accuracy (monitoring.py, checkpoints.py, recorder.py), it survives a resume, the record holds the
final and the best model's numbers (evaluation.py), `--select` shows one or the other and changes
nothing else (cli/, report/tables.py), a view row shows another row's run at its best epoch,
and no stored config hash changes while the split is off (config.py).

Validation scores are planted (runner.monitor wrapped) so that the best epoch is known."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from paper_repro import cli, results
from paper_repro.training import runner
from paper_repro.store.checkpoints import load_checkpoint, restore
from paper_repro.config import build_config
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from paper_repro.data import dataset_info
from paper_repro.data.splits import load_test_set
from paper_repro.errors import ConfigError
from paper_repro.robustness.evaluation import final_evaluation
from paper_repro.export import export_model, load_model
from paper_repro.training.methods import get_method
from paper_repro.models import build_model
from paper_repro.store.files import safe_load
from paper_repro.report.tables import table_frame
from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent
VAL_N = 64
REAL_MONITOR, REAL_SAVE = runner.monitor, runner.save_checkpoint


class Interrupt(Exception):
    pass


def _plant(monkeypatch, scores):
    """The runner's monitor, with these validation PGD accuracies, one per epoch in order
    (one sequence across an interrupted run and its resume)."""
    planted = iter(scores)

    def monitor(*args, **kwargs):
        out = REAL_MONITOR(*args, **kwargs)
        assert "val_pgd_acc" in out and "val_clean_acc" in out  # the real validation scores
        return {**out, "val_pgd_acc": float(next(planted))}

    monkeypatch.setattr(runner, "monitor", monitor)


def _record_weights(monkeypatch, *, die_after=None, die_before=None):
    """A copy of the weights at every epoch's checkpoint (by epoch); optionally killed right
    after the checkpoint of epoch `die_after`, or right before that of `die_before`."""
    saved = {}

    def save(path, cfg, model, optimizers, method, state):
        if state.epoch == die_before:
            raise Interrupt(f"killed before checkpoint {state.epoch}")
        REAL_SAVE(path, cfg, model, optimizers, method, state)
        saved[state.epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if state.epoch == die_after:
            raise Interrupt(f"killed after checkpoint {state.epoch}")

    monkeypatch.setattr(runner, "save_checkpoint", save)
    return saved


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _best(cfg) -> dict:
    return safe_load(results.run_dir(cfg.results_dir, cfg.run_path) / "best.pt")


@pytest.mark.parametrize("scores, best", [([10, 30, 20], 2), ([10, 30, 30], 2), ([5, 5, 7], 3)])
def test_best_pt_is_the_epoch_with_the_highest_validation_score(tmp_path, monkeypatch, scores,
                                                                  best):
    cfg = tiny_config(tmp_path, method="pgd_at", epochs=3, val_n=VAL_N)
    _plant(monkeypatch, scores)
    saved = _record_weights(monkeypatch)
    record = runner.train_run(cfg, quiet=True)
    stored = _best(cfg)
    assert stored["epoch"] == best and stored["val_pgd_acc"] == max(scores)  # ties: earliest
    assert _same(stored["model"], saved[best])
    assert not any(_same(stored["model"], saved[e]) for e in saved if e != best)
    assert (record["best_epoch"], record["best_val_pgd_acc"]) == (best, max(scores))
    assert record["epochs_done"] == 3 and record["val_n"] == VAL_N
    metrics = pd.read_csv(results.run_dir(cfg.results_dir, cfg.run_path) / "metrics.csv")
    assert metrics["val_pgd_acc"].tolist() == scores
    assert record["best_val_clean_acc"] == metrics["val_clean_acc"][best - 1]
    if best == 3:  # the last epoch is the best: the same weights, the same numbers
        assert record["best_clean_acc"] == record["clean_acc"]


@pytest.mark.parametrize("scores, best", [([10, 30, 20], 2), ([30, 10, 20], 1)])
def test_a_resumed_run_keeps_its_best_so_far(tmp_path, monkeypatch, scores, best):
    """Killed after epoch 2 of 3, resumed: epoch 3 (20) must not beat the best of epochs 1-2."""
    cfg = tiny_config(tmp_path, method="pgd_at", epochs=3, val_n=VAL_N)
    _plant(monkeypatch, scores)
    before = _record_weights(monkeypatch, die_after=2)
    with pytest.raises(Interrupt):
        runner.train_run(cfg, quiet=True)
    after = _record_weights(monkeypatch)
    record = runner.train_run(cfg, resume=True, quiet=True)
    assert list(after) == [3]  # only epoch 3 was trained again
    assert _best(cfg)["epoch"] == best and _same(_best(cfg)["model"], before[best])
    assert record["best_epoch"] == best and record["best_val_pgd_acc"] == 30


def test_a_kill_between_best_pt_and_its_checkpoint_restores_the_checkpoints_best(tmp_path,
                                                                                  monkeypatch):
    """Epoch 2 (30) writes best.pt, then dies before its checkpoint: the resumed run trains
    epoch 2 again, scored 5 this time, and 7 for epoch 3, so epoch 1 (10) is the best, and
    best.pt must hold epoch 1's weights, not those of the lost epoch 2."""
    cfg = tiny_config(tmp_path, method="pgd_at", epochs=3, val_n=VAL_N)
    _plant(monkeypatch, [10, 30, 5, 7])
    saved = _record_weights(monkeypatch, die_before=2)
    with pytest.raises(Interrupt):
        runner.train_run(cfg, quiet=True)
    assert _best(cfg)["epoch"] == 2  # written before the checkpoint that never came
    _record_weights(monkeypatch)
    record = runner.train_run(cfg, resume=True, quiet=True)
    assert record["best_epoch"] == 1 and record["best_val_pgd_acc"] == 10
    assert _best(cfg)["epoch"] == 1 and _same(_best(cfg)["model"], saved[1])


def test_asking_a_done_run_for_more_evaluation_measures_its_best_epoch_too(tmp_path,
                                                                          monkeypatch):
    _plant(monkeypatch, [10, 30, 20])
    first = runner.train_run(tiny_config(tmp_path, method="pgd_at", epochs=3, val_n=VAL_N,
                                     eval_checks=False), quiet=True)
    assert "checks" not in first and "best_checks" not in first
    again = runner.train_run(tiny_config(tmp_path, method="pgd_at", epochs=3, val_n=VAL_N),
                         quiet=True)  # the same run (checks are not hashed): re-evaluated
    assert again["checks"] and again["best_checks"] and again["best_epoch"] == 2
    assert again["best_clean_acc"] == first["best_clean_acc"] != again["clean_acc"]


def test_a_checkpoint_from_before_validation_splits_still_loads(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    runner.train_run(cfg, quiet=True)
    ckpt = load_checkpoint(results.run_dir(cfg.results_dir, cfg.run_path) / "checkpoint.pt", cfg)
    assert ckpt["best_epoch"] is None
    del ckpt["best_epoch"], ckpt["best_val_pgd_acc"]  # the format before this change
    model = build_model(cfg, dataset_info(cfg.dataset))
    method = get_method(cfg.method)(cfg)
    state = restore(ckpt, model, method.make_optimizers(model), method, torch.device("cpu"))
    assert state.epoch == 1 and state.best_epoch is None and state.best_score is None


def test_without_a_validation_split_nothing_changes(tmp_path):
    """The committed runs' configs keep their hashes (the split enters the hash only when set),
    and a run without the split writes what it wrote before: no best.pt, no val_* columns, no
    best_* record keys."""
    exp = load_experiment("regime")  # committed runs without a validation split
    cfg = resolve_row(exp, "mlp512-1k", "cpu")
    stored = REPO / "results" / "runs" / "cpu" / "regime" / "mlp512-1k" / "seed0" / "config.json"
    assert cfg.val_n == 0
    assert cfg.config_hash() == json.loads(stored.read_text())["config_hash"] == \
        cfg.config_hash(exclude=("val_n",))
    configs = sorted((REPO / "results" / "runs").glob("**/config.json"))
    assert len(configs) > 20
    for path in configs:  # every committed run, pre-trainings included
        values = json.loads(path.read_text())
        want = values.pop("config_hash")
        assert build_config((str(path), values)).config_hash() == want, path

    run = tiny_config(tmp_path, epochs=1)
    record = runner.train_run(run, quiet=True)
    directory = results.run_dir(run.results_dir, run.run_path)
    assert not (directory / "best.pt").exists()
    assert not [k for k in record if k.startswith(("best_", "val_"))]
    assert not [c for c in pd.read_csv(directory / "metrics.csv") if c.startswith("val_")]


# --- --select and view rows ------------------------------------------------------------------

EXPERIMENT = """
name = "es_test"
title = "Early stopping (test)"
[scales.smoke]
dataset = "fashion-mnist"
arch = "cnn-small"
model_args = {width = 4}
train_subset = 192
batch_size = 64
epochs = 3
eps = 0.1
eval_n = 40
eval_steps = 3
monitor_n = 20
monitor_steps = 1
eval_batch = 200
aa_n = 0
val_n = 64

[[rows]]
id = "pgd_at"
label = "PGD AT"
method = "pgd_at"

[[rows]]
id = "pgd_at_es"
label = "PGD AT (early stop, beyond the paper)"
view_of = "pgd_at"
select = "best"
"""
MEASURED = {"clean_acc", "clean_std", "pgd_acc", "pgd_std", "aa_acc", "aa_std", "checks",
            "best_epoch", "val_pgd_acc"}


def _experiment(tmp_path, text=EXPERIMENT) -> str:
    path = tmp_path / "es_test.toml"
    path.write_text(text)
    return str(path)


def test_select_changes_which_checkpoint_is_shown_and_nothing_else(tmp_path, monkeypatch,
                                                                     capsys):
    experiment, store = _experiment(tmp_path), tmp_path / "store"
    _plant(monkeypatch, [10, 30, 20])
    argv = ["run", "--experiment", experiment, "--scale", "smoke", "--deterministic",
            "--results-dir", str(store)]
    assert cli.main([*argv, "--select", "best"]) == 0
    run_dirs = [p.parent for p in (store / "runs").glob("**/record.json")]
    assert [d.name for d in run_dirs] == ["seed0"] and run_dirs[0].parent.name == "pgd_at"
    record_bytes = (run_dirs[0] / "record.json").read_bytes()
    record = json.loads(record_bytes)
    assert cli.main([*argv, "--select", "final"]) == 0  # done: trains and evaluates nothing
    assert (run_dirs[0] / "record.json").read_bytes() == record_bytes
    best_line, final_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "(best epoch 2)" in best_line and f"clean {record['best_clean_acc']:.2f}%" in best_line
    assert f"clean {record['clean_acc']:.2f}%" in final_line and "best epoch" not in final_line

    # the record's two sets of numbers are the protocol on checkpoint.pt and on best.pt
    cfg = resolve_row(load_experiment(experiment), "pgd_at", "smoke",
                      overrides={"results_dir": str(store), "deterministic": True})
    assert cfg.config_hash() == record["config_hash"]
    test_x, test_y = load_test_set(cfg)
    for select, prefix in (("final", ""), ("best", "best_")):
        model = load_model(cfg.run_path, select=select, results_dir=store)
        measured = final_evaluation(model, test_x, test_y, cfg, torch.device("cpu"))
        assert {k: measured[k] for k in ("clean_acc", "pgd_acc", "checks")} == \
            {k: record[prefix + k] for k in ("clean_acc", "pgd_acc", "checks")}
    assert (record["clean_acc"], record["pgd_acc"]) != \
        (record["best_clean_acc"], record["best_pgd_acc"])  # two models, told apart
    info = json.loads((export_model(cfg.run_path, tmp_path / "export", select="best",
                                    results_dir=store) / "model_info.json").read_text())
    assert (info["clean_acc"], info["training"]["best_epoch"]) == (record["best_clean_acc"], 2)

    tables = {}
    for select in ("final", "best"):
        assert cli.main(["table", experiment, "--scale", "smoke", "--results-dir", str(store),
                         "--select", select]) == 0
        name = "es_test" + ("-best" if select == "best" else "")
        tables[select] = pd.read_csv(store / "tables" / "smoke" / f"{name}.csv").set_index("row")
    final, best = tables["final"], tables["best"]
    assert final.loc["pgd_at", "clean_acc"] == pytest.approx(record["clean_acc"])
    assert best.loc["pgd_at", "clean_acc"] == pytest.approx(record["best_clean_acc"])
    assert best.loc["pgd_at", "best_epoch"] == 2 and pd.isna(final.loc["pgd_at", "best_epoch"])
    # the validation score of the model shown: the last epoch's, or the best epoch's
    metrics = pd.read_csv(run_dirs[0] / "metrics.csv")
    assert final.loc["pgd_at", "val_pgd_acc"] == record["val_pgd_acc"] == \
        metrics["val_pgd_acc"].iloc[-1]
    assert best.loc["pgd_at", "val_pgd_acc"] == record["best_val_pgd_acc"] == \
        metrics["val_pgd_acc"].max()
    same = [c for c in final.columns if c not in MEASURED]
    pd.testing.assert_frame_equal(final[same], best[same])
    # the view row shows the best epoch whatever the table's select
    for table in (final, best):
        assert table.loc["pgd_at_es", "clean_acc"] == pytest.approx(record["best_clean_acc"])
        assert table.loc["pgd_at_es", "pgd_acc"] == pytest.approx(record["best_pgd_acc"])
    assert (store / "tables" / "smoke" / "es_test.md").read_text().count("Best epoch") >= 1


def test_select_best_refuses_runs_without_a_validation_split(tmp_path, capsys):
    experiment = _experiment(tmp_path, EXPERIMENT.replace("val_n = 64", "val_n = 0"))
    assert cli.main(["run", "--experiment", experiment, "--scale", "smoke", "--select", "best",
                     "--results-dir", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "--select best" in err and "val_n" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()  # refused before anything was written


def _fake_run(store, row, seed, **record):
    d = results.run_dir(store, f"smoke/es_test/{row}/seed{seed}")
    results.atomic_write_json(d / "config.json", {"experiment": "es_test", "row": row,
                                                  "scale": "smoke", "seed": seed,
                                                  "method": "pgd_at", "arch": "cnn-small",
                                                  "dataset": "fashion-mnist",
                                                  "config_hash": f"h{seed}"})
    results.atomic_write_json(d / "record.json", {
        "status": "done", "train_minutes": 1.0, "train_flops": 2e12, "eval_n": 40,
        "cell_hash": "c", "checks": "ok", **record})


def test_a_view_row_shows_its_source_runs_at_their_best_epoch(tmp_path):
    experiment = _experiment(tmp_path)
    for seed, best_epoch in enumerate([2, 3]):
        _fake_run(tmp_path, "pgd_at", seed, clean_acc=80.0, pgd_acc=40.0, best_epoch=best_epoch,
                  best_clean_acc=76.0 + 2 * seed, best_pgd_acc=50.0, best_checks="ok")
    frame = table_frame(experiment, "smoke", tmp_path).set_index("row")
    assert frame.loc["pgd_at", "clean_acc"] == 80.0 and frame.loc["pgd_at", "pgd_acc"] == 40.0
    view = frame.loc["pgd_at_es"]
    assert (view["clean_acc"], view["pgd_acc"], view["n_seeds"]) == (77.0, 50.0, 2)
    assert view["best_epoch"] == "2/3" and view["method"].startswith("PGD AT (early stop")
    assert view["status"] == "done" and view["cost_pflop"] == frame.loc["pgd_at", "cost_pflop"]

    # a source run without a best epoch: the view says so, and shows no number
    _fake_run(tmp_path / "plain", "pgd_at", 0, clean_acc=80.0, pgd_acc=40.0)
    plain = table_frame(experiment, "smoke", tmp_path / "plain").set_index("row")
    assert plain.loc["pgd_at_es", "status"] == "no best epoch (val_n = 0)"
    assert pd.isna(plain.loc["pgd_at_es", "clean_acc"])


def test_a_view_row_trains_nothing(tmp_path):
    experiment = _experiment(tmp_path)
    parser = cli.build_parser()

    def configs(*extra):
        args = parser.parse_args(["sweep", experiment, "--scale", "smoke", *extra])
        return [c.run_path for c in cli.train._experiment_configs(args, experiment, "smoke")]

    assert configs() == ["smoke/es_test/pgd_at/seed0"]
    assert configs("--rows", "pgd_at_es") == configs("--rows", "pgd_at,pgd_at_es") == configs()


@pytest.mark.parametrize("row, message", [
    ('view_of = "nothing"', "view_of must name another row"),
    ('view_of = "pgd_at"\nlr = 0.2', "takes no config keys \\(lr\\)"),
    ('view_of = "pgd_at"\nselect = "worst"', "select must be one of final, best"),
])
def test_a_bad_view_row_is_one_line(tmp_path, row, message):
    text = EXPERIMENT.split("[[rows]]\nid = \"pgd_at_es\"")[0] + f'[[rows]]\nid = "v"\n{row}\n'
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(_experiment(tmp_path, text))
    assert "\n" not in str(info.value)
