"""config.py: resolution order, validation with one-line errors, hashing, experiment files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from paper_repro.config import build_config, parse_override
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from paper_repro.errors import ConfigError
from paper_repro.training.methods import get_method
from paper_repro.training.pipeline import plan

REPO = Path(__file__).resolve().parent.parent


def _row(row, scale, **overrides):
    exp = load_experiment("table1")
    return resolve_row(exp, row, scale, overrides=overrides)


def test_paper_scale_rows_use_the_papers_setup():
    natural, pgd, aft = _row("natural", "paper"), _row("pgd_at", "paper"), _row("aft", "paper")
    assert (natural.dataset, natural.arch, natural.epochs) == ("cifar10", "wrn-32-10", 200)
    assert natural.schedule_args == {"milestones": [0.3, 0.6, 0.8], "gamma": 0.2}
    assert natural.eps == pytest.approx(8 / 255) and natural.eval_steps == 20
    assert pgd.arch == "wrn-32-10" and pgd.weight_decay == 2e-4 and pgd.wd_scope == "weights"
    assert (aft.arch, aft.optimizer, aft.epochs, aft.schedule) == \
        ("wrn-28-10", "adam", 10, "slow_start_fast_decay")
    assert aft.pretrain == {"model_args": {"dropout": 0.3}}
    assert aft.eval_alpha_value == pytest.approx(2 / 255)  # α = ε/4


def test_scale_blocks_rows_and_cli_layer_in_order():
    cpu = _row("aft", "cpu")
    assert (cpu.dataset, cpu.arch, cpu.eps, cpu.epochs) == ("fashion-mnist", "mlp", 0.1, 10)
    assert (cpu.train_subset, cpu.val_n, cpu.augment_pad, cpu.augment_flip) == (1000, 500, 0, False)
    smoke = _row("aft", "smoke")  # inherits cpu, then its own block
    assert smoke.dataset == "fashion-mnist" and smoke.train_subset == 256 and smoke.epochs == 1
    cli = _row("aft", "cpu", epochs=7, schedule_args={"peak_at": 0.2})
    assert cli.epochs == 7
    assert cli.schedule_args == {"start_factor": 0.05, "peak_at": 0.2, "end_factor": 0.01}


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"eps": -0.1}, "eps must be in"),
    ({"eps": "eight"}, "eps: expected a number"),
    ({"lr": 0}, "lr must be > 0"),
    ({"batch_size": "big"}, "batch_size: expected an integer"),
    ({"optimizer": "lion"}, "optimizer: 'lion' is not one of"),
    ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
    ({"deterministic": "yes"}, "expected true or false"),
])
def test_bad_values_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        _row("natural", "cpu", **overrides)
    assert "\n" not in str(info.value)


def test_eps_accepts_fractions_and_hash_tracks_results_not_paths():
    a = build_config(("t", {"eps": "8/255"}))
    b = build_config(("t", {"eps": 8 / 255, "results_dir": "/elsewhere", "device": "cpu"}))
    c = build_config(("t", {"eps": 8 / 255, "lr": 0.2}))
    assert a.eps == pytest.approx(8 / 255)
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert a.cell_hash() == build_config(("t", {"eps": "8/255"}), seed=3).cell_hash()
    assert a.config_hash() != build_config(("t", {"eps": "8/255"}), seed=3).config_hash()


def test_unknown_experiment_row_and_malformed_toml(tmp_path):
    with pytest.raises(ConfigError, match="no experiment file"):
        load_experiment("table9")
    with pytest.raises(ConfigError, match="has no row 'nope'"):
        load_experiment("table1").row("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[[rows]\nid=1")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_experiment(str(bad))


def test_method_settings_are_validated():
    with pytest.raises(ConfigError, match="unknown setting"):
        get_method("pgd_at")(build_config(("t", {"method_args": {"stepz": 3}}), method="pgd_at"))
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        get_method("pgd_at")(build_config(("t", {"method_args": {"steps": 0}}), method="pgd_at"))
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("no_such_method")


def test_parse_override():
    assert parse_override("epochs=3") == ("epochs", 3)
    assert parse_override("eps=8/255") == ("eps", "8/255")
    assert parse_override("schedule_args.peak_at=0.2") == ("schedule_args", {"peak_at": 0.2})
    with pytest.raises(ConfigError):
        parse_override("epochs")


def test_changing_the_schedule_drops_the_old_schedules_arguments():
    cfg = _row("aft", "cpu", schedule="constant")
    assert cfg.schedule == "constant" and cfg.schedule_args == {}
    assert _row("aft", "cpu").pretrain == {"epochs": 195}


def test_controlled_runs_every_row_on_one_architecture():
    exp = load_experiment("table1")
    for row in exp.row_ids:
        cfg = resolve_row(exp, row, "paper",
                          controlled_arch="preact-resnet18")
        assert cfg.arch == "preact-resnet18" and cfg.model_args == {}
        assert cfg.experiment == "table1-controlled-preact-resnet18"
        assert cfg.eval_steps == 20 and cfg.eps == pytest.approx(8 / 255)
        if cfg.pretrain is not None:
            assert "model_args" not in cfg.pretrain


def test_every_committed_record_keeps_its_config_hash():
    """Every committed record of every experiment, and every committed pre-training (stored
    by hash, reached through its fine-tune's graph of runs), is the run its row resolves to
    today: a change to the code that moved a hash would orphan it."""
    records = sorted((REPO / "results" / "runs").glob("**/record.json"))
    pretrainings = {json.loads(p.read_text())["config_hash"]: p for p in records
                    if p.parent.parent.name == "pretrain"}
    reached: set[str] = set()
    rows = 0
    for path in records:
        if path.parent.parent.name == "pretrain":
            continue
        config = json.loads((path.parent / "config.json").read_text())
        cfg = resolve_row(load_experiment(config["experiment"]), config["row"],
                          config["scale"], seed=config["seed"])
        assert cfg.config_hash() == json.loads(path.read_text())["config_hash"], path
        rows += 1
        reached |= {run.cfg.config_hash() for run in plan([cfg]).values()} & set(pretrainings)
    assert rows >= 100 and len(pretrainings) >= 10
    assert len(list((REPO / "results/runs/cpu/table1").glob("*/seed*/record.json"))) >= 8
    assert reached == set(pretrainings), [str(pretrainings[h]) for h in
                                          set(pretrainings) - reached]


def test_evaluation_settings_are_not_part_of_a_runs_identity():
    """AutoAttack and the checks measure a trained model: asking for them (or not) keeps the
    hash, so a done run is re-evaluated from its checkpoint instead of orphaned."""
    cpu = _row("pgd_at", "cpu")
    # all 1,000 PGD images for the rows the paired comparisons use, 200 for the others
    assert (cpu.aa_n, cpu.eval_checks, _row("pgd_at", "smoke").aa_n) == (1000, True, 0)
    assert (_row("natural", "cpu").aa_n, _row("natural", "smoke").aa_n) == (200, 0)
    assert _row("pgd_at", "paper").aa_n is None  # all the PGD images, as RobustBench
    off = _row("pgd_at", "cpu", aa_n=0, eval_checks=False)
    assert off.config_hash() == cpu.config_hash() and off.cell_hash() == cpu.cell_hash()
    with pytest.raises(ConfigError, match="aa_n must be >= 0"):
        _row("pgd_at", "cpu", aa_n=-1)


def test_an_experiment_file_sets_how_many_seeds_a_sweep_runs(tmp_path):
    """table1 runs 3 seeds per row at cpu scale (mean ± std cells) without --seeds; --seeds
    overrides; other scales and files default to one; a bad count is one clear error."""
    from paper_repro import cli
    parser = cli.build_parser()

    def seeds(*argv: str, scale: str = "cpu", name: str = "table1") -> set[int]:
        args = parser.parse_args(["sweep", name, "--scale", scale, *argv])
        return {c.seed for c in cli.train._experiment_configs(args, name, scale)}

    assert load_experiment("table1").seeds == {"cpu": 3}
    assert seeds() == {0, 1, 2} and seeds("--seeds", "1") == {0}
    assert seeds("--seed", "5") == {5, 6, 7}
    assert seeds(scale="smoke") == {0} and seeds(name="table2") == {0}

    bad = tmp_path / "bad.toml"
    bad.write_text('seeds = { cpu = 0 }\n[[rows]]\nid = "a"\nmethod = "natural"\n')
    with pytest.raises(ConfigError, match="seeds must map scales") as info:
        load_experiment(str(bad))
    assert "\n" not in str(info.value)


def test_run_of_one_row_trains_one_seed_unless_asked(monkeypatch):
    """An experiment's `seeds` is for its sweeps: `run --experiment table1 --row R` is one run."""
    from paper_repro import cli
    from paper_repro.orchestration import pool
    trained = []
    monkeypatch.setattr(pool, "train_all", lambda configs, slots, **kw:
                        trained.extend(cfg.seed for cfg in configs) or pool.Outcome())
    monkeypatch.setattr(cli.train, "_report", lambda record, select="final": None)
    argv = ["run", "--experiment", "table1", "--row", "natural", "--scale", "cpu"]
    assert cli.main(argv) == 0 and trained == [0]
    assert cli.main([*argv, "--seeds", "2"]) == 0 and trained == [0, 0, 1]


def test_field_roles_declared_on_runconfig_derive_the_old_lists():
    """The roles of the config fields are declared once, on RunConfig (field metadata); the
    lists config.py, pipeline.py and export.py kept by hand (written here as they were) are
    derived from them, unchanged. A new field must be declared hash-stable (or say otherwise
    here): the always-hashed fields are the ones the stored results were hashed with."""
    from paper_repro import config

    assert config._EXECUTION_FIELDS == {"device", "results_dir", "data_root"}
    assert config.EVALUATION_FIELDS == {"aa_n", "eval_checks"}
    assert config.HASH_STABLE_FIELDS == {"train_eps", "precision", "channels_last", "compile",
                                         "val_n", "aa_n", "eval_checks"}
    assert set(config.PRETRAIN_INHERITED_FIELDS) == {
        "dataset", "data_root", "train_subset", "val_n", "arch", "model_args", "seed", "device",
        "deterministic", "results_dir", "eval_steps", "eval_alpha", "eval_n", "eval_batch",
        "monitor_n", "monitor_steps", "eps", "augment_pad", "augment_flip", "max_steps",
        "precision", "channels_last", "compile", "eval_checks"}
    assert len(set(config.PRETRAIN_INHERITED_FIELDS)) == len(config.PRETRAIN_INHERITED_FIELDS)
    assert config.NOT_RECIPE_FIELDS == {  # export.py's model_info "recipe" leaves these out
        "experiment", "row", "scale", "seed", "device", "results_dir", "data_root",
        "deterministic", "max_steps", "aa_n", "eval_checks"}
    assert set(config._fields_where(hashed="always")) == {
        "experiment", "row", "scale", "seed", "method", "method_args", "dataset", "train_subset",
        "extra_data", "extra_data_n", "extra_data_path", "batch_size", "augment_pad",
        "augment_pad_mode", "augment_pad_value", "augment_flip", "drop_last", "arch",
        "model_args", "init", "pretrain", "epochs", "optimizer", "lr", "momentum", "nesterov",
        "weight_decay", "wd_scope", "schedule", "schedule_args", "eps", "eval_steps",
        "eval_alpha", "eval_n", "eval_batch", "monitor_n", "monitor_steps", "deterministic",
        "max_steps"}
