"""runner.py + results.py + pipeline.py: the store, resume, the graph of runs (pre-training
reuse, prerequisites first), records that never lie."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from paper_repro import results
from paper_repro.store import files
from paper_repro.orchestration import local
from paper_repro.training import pipeline
from paper_repro.training import runner
from paper_repro.training.methods import get_method, list_methods
from paper_repro.errors import CheckpointError, ConfigError, ReproError
from conftest import tiny_config


class Interrupt(Exception):
    pass


def _interrupt_after_first_checkpoint(monkeypatch, directory):
    """Kill the run right after its first epoch checkpoint (other runs, e.g. the AFT
    pre-training, are left alone)."""
    real = runner.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if path.parent == directory:
            raise Interrupt("killed after epoch 1")

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)


@pytest.mark.parametrize("method", list_methods())
def test_resume_gives_the_same_final_metrics(tmp_path, monkeypatch, method):
    """Every registered method, killed after its first epoch's checkpoint and resumed, ends
    where an uninterrupted run ends: what it carries across epochs is in its state_dict."""
    extra = {"pretrain": {"epochs": 1}} if get_method(method).fine_tunes else {}
    straight = local.train_with_prerequisites(tiny_config(tmp_path / "a", method=method, **extra), quiet=True)

    cfg = tiny_config(tmp_path / "b", method=method, **extra)
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    _interrupt_after_first_checkpoint(monkeypatch, directory)
    with pytest.raises(Interrupt):
        local.train_with_prerequisites(cfg, quiet=True)
    record = results.read_record(directory)
    assert record["status"] == results.STATUS_RUNNING  # never claims done early
    monkeypatch.undo()
    resumed = local.train_with_prerequisites(cfg, resume=True, quiet=True)

    for key in ("clean_acc", "pgd_acc", "steps_done", "epochs_done", "train_flops"):
        assert resumed[key] == straight[key], key
    a = pd.read_csv(tmp_path / "a" / "runs" / cfg.run_path / "metrics.csv")
    b = pd.read_csv(tmp_path / "b" / "runs" / cfg.run_path / "metrics.csv")
    cols = [c for c in a.columns if c != "train_time_s"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_done_run_is_skipped_and_record_is_complete(tmp_path):
    cfg = tiny_config(tmp_path)
    first = runner.train_run(cfg, quiet=True)
    assert first["status"] == "done"
    for key in ("clean_acc", "pgd_acc", "train_time_s", "train_flops", "hardware", "code",
                "config_hash", "eval_n", "steps_per_epoch"):
        assert key in first, key
    assert first["train_flops"] > 0 and first["code"]["torch"] == torch.__version__
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    mtime = (directory / "record.json").stat().st_mtime_ns
    again = runner.train_run(cfg, quiet=True)
    assert again == first and (directory / "record.json").stat().st_mtime_ns == mtime
    config = json.loads((directory / "config.json").read_text())
    assert config["config_hash"] == cfg.config_hash() and config["epochs"] == 2
    assert len(pd.read_csv(directory / "metrics.csv")) == 2
    assert len(pd.read_csv(directory / "lr.csv")) == first["steps_done"]


def test_aft_pretraining_is_reused_by_config_hash(tmp_path):
    a = local.train_with_prerequisites(tiny_config(tmp_path, method="aft", pretrain={"epochs": 1}), quiet=True)
    pretrain_dirs = list((tmp_path / "runs" / "smoke" / "pretrain").iterdir())
    assert len(pretrain_dirs) == 1 and a["pretrain_source"] == str(pretrain_dirs[0])
    assert a["pretrain_minutes"] is not None and a["pretrain_flops"] > 0
    cfg_b = tiny_config(tmp_path, method="aft", pretrain={"epochs": 1}, experiment="other")
    mtime = (pretrain_dirs[0] / "record.json").stat().st_mtime_ns
    b = local.train_with_prerequisites(cfg_b, quiet=True)
    assert b["pretrain_source"] == a["pretrain_source"]
    assert (pretrain_dirs[0] / "record.json").stat().st_mtime_ns == mtime  # not retrained


def test_a_done_pretraining_without_its_checkpoint_says_how_to_recover(tmp_path):
    """A fresh clone holds the committed records but no checkpoint.pt: a new fine-tuning
    from that pre-training stops with one line and leaves the committed record alone."""
    local.train_with_prerequisites(tiny_config(tmp_path, method="aft", pretrain={"epochs": 1}), quiet=True)
    (pretrain,) = (tmp_path / "runs" / "smoke" / "pretrain").iterdir()
    (pretrain / "checkpoint.pt").unlink()
    before = (pretrain / "record.json").read_bytes()
    cfg = tiny_config(tmp_path, method="aft", pretrain={"epochs": 1}, experiment="other")
    for train in (local.train_with_prerequisites, runner.train_run):
        with pytest.raises(CheckpointError, match="is done but its checkpoint.pt is not in"):
            train(cfg, quiet=True)
    assert (pretrain / "record.json").read_bytes() == before
    assert not results.run_dir(cfg.results_dir, cfg.run_path).exists()


def test_a_different_config_never_overwrites_a_run(tmp_path):
    runner.train_run(tiny_config(tmp_path), quiet=True)
    with pytest.raises(ReproError, match="another config"):
        runner.train_run(tiny_config(tmp_path, lr=0.05), quiet=True)


def test_resume_with_nothing_to_resume(tmp_path):
    with pytest.raises(ReproError, match="nothing to resume"):
        runner.train_run(tiny_config(tmp_path), resume=True, quiet=True)


def test_init_from_file_is_loaded_safely(tmp_path):
    cfg = tiny_config(tmp_path)
    runner.train_run(cfg, quiet=True)
    ckpt = results.run_dir(cfg.results_dir, cfg.run_path) / "checkpoint.pt"
    rec = runner.train_run(tiny_config(tmp_path / "ft", method="aft", init=str(ckpt)), quiet=True)
    assert rec["status"] == "done" and rec["pretrain_source"] == str(ckpt)
    # a full-model pickle is refused, never executed
    bad = tmp_path / "full_model.pt"
    torch.save(torch.nn.Linear(2, 2), bad)
    with pytest.raises(CheckpointError, match="full pickle"):
        runner.train_run(tiny_config(tmp_path / "bad", method="aft", init=str(bad)), quiet=True)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        runner.train_run(tiny_config(tmp_path / "tr", method="aft", init=str(truncated)), quiet=True)


def test_atomic_writes_leave_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    results.atomic_write_json(path, {"status": "running"})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        results.atomic_write_json(path, {"status": "done"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp file left


def test_store_load_returns_one_frame(tmp_path):
    runner.train_run(tiny_config(tmp_path), quiet=True)
    runner.train_run(tiny_config(tmp_path, method="pgd_at"), quiet=True)
    df = results.load(tmp_path)
    assert sorted(df["row"]) == ["natural", "pgd_at"]
    assert set(df["status"]) == {"done"} and df["clean_acc"].notna().all()


def test_pretrain_only_for_fine_tuning_methods(tmp_path):
    with pytest.raises(ConfigError, match="trains from scratch"):
        runner.train_run(tiny_config(tmp_path, method="pgd_at", pretrain={"epochs": 1}), quiet=True)
    with pytest.raises(ConfigError, match="fine-tunes: set init"):
        runner.train_run(tiny_config(tmp_path, method="aft", pretrain=None), quiet=True)


def test_the_runner_never_trains_a_prerequisite(tmp_path):
    """runner.train_run trains exactly the run it is given: an AFT row whose pre-training is not
    done stops with one line, before anything is written."""
    cfg = tiny_config(tmp_path, method="aft", pretrain={"epochs": 1})
    with pytest.raises(ReproError, match=r"needs run smoke/pretrain/\w+ done first"):
        runner.train_run(cfg, quiet=True)
    assert not (tmp_path / "runs").exists()


def _self_training_row(tmp_path):
    """AFT(+500K)'s cpu stand-in in small: a pre-training on pseudo-labelled extra images."""
    return tiny_config(tmp_path, method="aft", train_subset=128,
                       pretrain={"epochs": 1, "extra_data": "pseudo-label", "extra_data_n": 64})


def test_the_graph_of_self_training_is_teacher_then_pretraining_then_fine_tune(tmp_path,
                                                                                monkeypatch):
    """One graph (pipeline.plan); the local path trains it in that order, the launcher
    submits the same nodes with the same needs."""
    from slurm import status as slurm_status

    cfg = _self_training_row(tmp_path)
    pre = pipeline.pretrain_config(cfg)
    teacher = pipeline.teacher_config(pre)
    assert pre.extra_data == "pseudo-label" and teacher.extra_data is None
    graph = list(pipeline.plan([cfg]).values())
    assert [r.cfg.config_hash() for r in graph] == [teacher.config_hash(), pre.config_hash(),
                                                     cfg.config_hash()]
    assert graph[0].needs == () and graph[1].needs == (graph[0].directory,)
    assert graph[2].needs == (graph[1].directory,)
    submitted = list(slurm_status.plan_sweep([cfg]).values())
    assert [(r.run_path, [n.name for n in r.needs]) for r in submitted] == \
        [(r.run_path, [n.name for n in r.needs]) for r in graph]

    trained = []
    monkeypatch.setattr(runner, "train_run",
                        lambda c, run_path=None, **kw: trained.append(run_path) or {})
    local.train_with_prerequisites(cfg, quiet=True)
    assert trained == [r.run_path for r in graph]


def test_self_training_end_to_end_trains_each_run_once(tmp_path):
    cfg = _self_training_row(tmp_path)
    record = local.train_with_prerequisites(cfg, quiet=True)
    assert record["status"] == "done"
    pretrains = sorted(p.name for p in (tmp_path / "runs" / "smoke" / "pretrain").iterdir())
    pre = pipeline.pretrain_config(cfg)
    assert pretrains == sorted([pre.config_hash(), pipeline.teacher_config(pre).config_hash()])
    pre_record = results.read_record(tmp_path / "runs" / "smoke" / "pretrain" / pre.config_hash())
    assert pre_record["train_images"] == 128 + 64  # labelled + pseudo-labelled
