"""Every paper-scale row of Tables 1-3 (real architectures and recipes) runs one optimiser step
on tiny files in the real on-disk format (CIFAR-10 and CIFAR-100 python pickles, an ImageNet
ImageFolder of JPEGs streamed through the runner, torchvision's and timm's weight files), so that
a paper-scale config cannot crash on a cluster after hours in the queue. Only the size knobs are
shrunk (batch, evaluation subset)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from paper_repro import results
from pathlib import Path

import torch
import torchvision

from paper_repro import train  # trains a row's prerequisites (pre-training, teacher) first
from paper_repro.config import build_config
from paper_repro.experiment import load_experiment
from paper_repro.training.methods import resolve_row
from paper_repro.errors import ConfigError
from paper_repro.training.methods import get_method
from test_data import _cifar_rows, _write_cifar10, _write_image_folder, _write_pickle

TABLE1 = load_experiment("table1")
TABLE2 = load_experiment("table2")
TABLE3 = load_experiment("table3")
SHRUNK = {"max_steps": 1, "batch_size": 2, "eval_n": 2, "eval_steps": 1, "monitor_n": 0,
          "eval_batch": 4, "device": "cpu",
          "aa_n": 0, "eval_checks": False}  # evaluation is tested elsewhere


def _one_step(experiment, row, overrides):
    if experiment.scales["paper"].get("val_n"):  # Rice's 1,000 would leave no tiny set to train
        overrides = {"val_n": 2, **overrides}
    cfg = resolve_row(experiment, row, "paper", overrides={**SHRUNK, **overrides})
    return cfg, train(cfg, quiet=True)


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
    overrides = {"data_root": str(cifar_root), "results_dir": str(tmp_path)}
    if row == "aft_500k":
        overrides["pretrain"] = {"extra_data_path": str(cifar_root / "ti500k.pickle")}
    cfg, record = _one_step(TABLE1, row, overrides)
    assert cfg.dataset == "cifar10" and cfg.eps == pytest.approx(8 / 255)
    assert record["status"] == results.STATUS_DONE and record["steps_done"] == 1
    assert record["best_epoch"] == 1 and record["val_n"] == 2  # the paper rows validate too
    assert record["train_flops"] > 0


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 4), ("test", 4)):  # torchvision's files: fine and coarse labels
        _write_pickle(str(folder / name), {
            b"data": _cifar_rows(rng, n), b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(), b"filenames": [b"x.png"] * n})
    return root


@pytest.mark.parametrize("row", TABLE2.row_ids)
def test_table2_paper_row_runs_one_step(tmp_path, cifar100_root, row):
    cfg, record = _one_step(TABLE2, row, {"data_root": str(cifar100_root),
                                          "results_dir": str(tmp_path)})
    assert cfg.dataset == "cifar100" and cfg.eps == pytest.approx(8 / 255)
    assert record["status"] == results.STATUS_DONE
    assert record["steps_done"] == (0 if cfg.epochs == 0 else 1)
    assert record["train_images"] == 4 - 2  # two of the four held out for validation


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """Six JPEGs per split in ImageFolder's layout, and ResNet-50 weight files where the
    Table 3 rows' torchvision and timm names find them offline."""
    root = tmp_path_factory.mktemp("imagenet")
    _write_image_folder(root)
    hub = root / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    torch.save(state, hub / Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url).name)
    torch.save(state, root / "swsl.pth")  # timm's resnet50 has torchvision's keys
    return root


@pytest.mark.parametrize("row", TABLE3.row_ids)
def test_table3_paper_row_streams_imagenet_for_one_step(tmp_path, imagenet_root, row,
                                                         monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(imagenet_root / "torch_home"))
    monkeypatch.setenv("REPRO_WORKERS", "0")
    overrides = {"data_root": str(imagenet_root), "results_dir": str(tmp_path)}
    if row == "aft_swsl":
        overrides["init"] = f"{TABLE3.row(row)['paper']['init']}:{imagenet_root / 'swsl.pth'}"
    if row == "atta":
        with pytest.raises(ConfigError, match="not supported at scale paper"):
            _one_step(TABLE3, row, overrides)
        return
    cfg, record = _one_step(TABLE3, row, overrides)
    assert cfg.dataset == "imagenet" and cfg.eps == pytest.approx(2 / 255)
    assert record["status"] == results.STATUS_DONE
    assert record["steps_done"] == (0 if cfg.epochs == 0 else 1)
    assert record["train_images"] == 6 and record["eval_n"] == 2


def test_a_streamed_dataset_refuses_what_needs_the_training_set_in_memory(tmp_path,
                                                                          imagenet_root):
    """ATTA keeps a perturbation per training image; a labelled subset needs the whole set."""
    for method, extra in (("atta", {"augment_pad": 0, "augment_flip": False}),
                          ("pgd_at", {"train_subset": 4})):
        row = resolve_row(TABLE3, "pgd_at", "paper", overrides={
            **SHRUNK, "data_root": str(imagenet_root), "results_dir": str(tmp_path)})
        cfg = build_config(("Table 3's PGD AT row", row.to_dict()),
                           (f"{method}'s recipe", get_method(method).recipe),
                           ("test", {**extra, "method": method, "method_args": {}}))
        assert cfg.method == method and cfg.dataset == "imagenet"
        with pytest.raises(ConfigError, match="stream"):
            train(cfg, quiet=True)
    assert not any(tmp_path.iterdir())  # refused before anything was written
