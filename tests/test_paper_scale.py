"""Every paper-scale Table 1 row (real architectures and recipes) runs one optimiser step on
tiny CIFAR-10 files in the real on-disk format, so that a paper-scale config cannot crash on a
cluster after hours in the queue. Only the size knobs are shrunk (batch, evaluation subset)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from paper_repro import results
from paper_repro.config import load_experiment, resolve_row
from paper_repro.methods import get_method
from paper_repro.runner import train
from test_data import _write_cifar10

TABLE1 = load_experiment("table1")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar10(str(root / "cifar-10-batches-py"), per_batch=2, test=4)
    rng = np.random.default_rng(0)
    with open(root / "ti500k.pickle", "wb") as f:  # Carmon et al.'s format, 6 images
        pickle.dump({"data": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
                     "extrapolated_targets": rng.integers(0, 10, 6).tolist()}, f)
    return root


@pytest.mark.parametrize("row", TABLE1.row_ids)
def test_paper_row_runs_one_step(tmp_path, cifar_root, row):
    method = TABLE1.row(row)["method"]
    overrides = {"data_root": str(cifar_root), "results_dir": str(tmp_path), "max_steps": 1,
                 "batch_size": 2, "eval_n": 2, "eval_steps": 1, "monitor_n": 0,
                 "eval_batch": 4, "device": "cpu",
                 "aa_n": 0, "eval_checks": False}  # evaluation is tested elsewhere
    if row == "aft_500k":
        overrides["pretrain"] = {"extra_data_path": str(cifar_root / "ti500k.pickle")}
    cfg = resolve_row(TABLE1, row, "paper", overrides=overrides,
                      method_recipe=get_method(method).recipe)
    assert cfg.dataset == "cifar10" and cfg.eps == pytest.approx(8 / 255)
    record = train(cfg, quiet=True)
    assert record["status"] == results.STATUS_DONE and record["steps_done"] == 1
    assert record["train_flops"] > 0
