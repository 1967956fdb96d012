"""recorder.py: what a run writes, beyond the record (test_runner.py, test_failures.py): its
curves as TensorBoard scalars, equal to metrics.csv and lr.csv, also across a resume; and a
run that trains as before, saying so once, where tensorboard is not installed."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from paper_repro import results
from paper_repro.training import recorder
from paper_repro.training import runner
from conftest import tiny_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(directory / recorder.TENSORBOARD_DIR),
                                                size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _assert_scalars_equal_csv(directory) -> dict[str, list[tuple[int, float]]]:
    scalars = _scalars(directory)
    metrics = pd.read_csv(directory / "metrics.csv")
    columns = [c for c in metrics.columns if c not in ("epoch", "step")]
    assert sorted(scalars) == sorted([f"epoch/{c}" for c in columns] + ["step/lr"])
    for column in columns:
        assert [s for s, _ in scalars[f"epoch/{column}"]] == metrics["epoch"].tolist()
        assert [v for _, v in scalars[f"epoch/{column}"]] == \
            pytest.approx(metrics[column].tolist(), rel=1e-6)  # float32 in the event file
    lr = pd.read_csv(directory / "lr.csv")
    assert [s for s, _ in scalars["step/lr"]] == lr["step"].tolist()
    assert [v for _, v in scalars["step/lr"]] == pytest.approx(lr["lr"].tolist(), rel=1e-6)
    return scalars


def test_a_runs_event_file_holds_its_metrics(tmp_path):
    cfg = tiny_config(tmp_path, method="pgd_at", epochs=3)
    record = runner.train_run(cfg, quiet=True)
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    scalars = _assert_scalars_equal_csv(directory)
    assert len(scalars["epoch/test_pgd_acc"]) == 3
    assert len(scalars["step/lr"]) == record["steps_done"] > 3


def test_a_resumed_run_has_the_events_of_an_uninterrupted_one(tmp_path, monkeypatch):
    straight_cfg = tiny_config(tmp_path / "a", epochs=3)
    runner.train_run(straight_cfg, quiet=True)
    cfg = tiny_config(tmp_path / "b", epochs=3)
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    real = runner.seed_epoch

    def stop_at_epoch_two(cfg, epoch, rank=0):  # after checkpoint 2 (the events of 2 epochs)
        if epoch == 2:
            raise KeyboardInterrupt
        real(cfg, epoch, rank)

    monkeypatch.setattr(runner, "seed_epoch", stop_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        runner.train_run(cfg, quiet=True)
    monkeypatch.undo()
    runner.train_run(cfg, resume=True, quiet=True)
    resumed = _assert_scalars_equal_csv(directory)
    straight = _scalars(results.run_dir(straight_cfg.results_dir, straight_cfg.run_path))
    del resumed["epoch/train_time_s"], straight["epoch/train_time_s"]
    assert resumed == straight


def test_without_tensorboard_runs_train_and_say_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(recorder, "_said_no_tensorboard", [])
    for experiment in ("first", "second"):
        cfg = tiny_config(tmp_path, epochs=1, experiment=experiment)
        assert runner.train_run(cfg, quiet=True)["status"] == results.STATUS_DONE
        assert not (results.run_dir(cfg.results_dir, cfg.run_path) / "tensorboard").exists()
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
