"""data/splits.py: the validation split. Its images are held out of every run's training (the
labelled subset, self-training's pseudo-label pool) and are not test images, and they are the
same for every row, method and seed of a dataset."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from paper_repro.config import build_config
from paper_repro.data import load_arrays
from paper_repro.data.splits import load_data, train_split
from paper_repro.errors import ConfigError
from paper_repro.training.pipeline import pretrain_config, teacher_config
from conftest import tiny_config

VAL_N = 200


def _images(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in x}


def _labeller(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(images), dtype=torch.int64)


def test_validation_images_are_held_out_of_training_and_not_test_images(tmp_path):
    cfg = tiny_config(tmp_path, val_n=VAL_N, extra_data="pseudo-label", extra_data_n=300)
    data = load_data(cfg, _labeller)
    train_x, _ = load_arrays("fashion-mnist", None, train=True)
    test_x, _ = load_arrays("fashion-mnist", None, train=False)
    split = train_split(len(train_x), cfg)
    labelled, pool, val = (set(i.tolist()) for i in (split.labelled, split.pool, split.val))
    assert len(val) == VAL_N and not val & labelled and not val & pool
    assert torch.equal(data.val_x, train_x[split.val])  # drawn from the training file...
    seen = _images(data.train_x)  # labelled + pseudo-labelled: everything the run trains on
    assert len(data.train_x) == 192 + 300
    # ...and no validation image is one the run trains on or a test image (Fashion-MNIST has
    # no duplicate images within its training file nor between its training and test files)
    assert not _images(data.val_x) & seen and not _images(data.val_x) & _images(test_x)


def test_the_validation_split_is_the_same_for_every_row_method_and_seed(tmp_path):
    reference = load_data(tiny_config(tmp_path, val_n=VAL_N))
    others = [dataclasses.replace(tiny_config(tmp_path, method="pgd_at", val_n=VAL_N), seed=3),
              tiny_config(tmp_path, method="fast_at", train_subset=2000, val_n=VAL_N),
              tiny_config(tmp_path, train_subset=None, val_n=VAL_N)]  # paper-scale style
    for cfg in others:
        data = load_data(cfg)
        assert torch.equal(data.val_x, reference.val_x) and torch.equal(data.val_y,
                                                                        reference.val_y)
    # a smaller split is part of a larger one: the last images of one fixed permutation
    assert _images(reference.val_x) <= _images(load_data(tiny_config(tmp_path,
                                                                     val_n=2 * VAL_N)).val_x)


def test_with_a_labelled_subset_the_split_changes_no_training_image(tmp_path):
    """cpu scale: validation images come from the part of the pool the subset does not use,
    so a run trains on exactly the images it trained on without them."""
    without = load_data(tiny_config(tmp_path))
    with_val = load_data(tiny_config(tmp_path, val_n=VAL_N))
    assert without.val_x is None
    assert torch.equal(without.train_x, with_val.train_x)


def test_without_a_labelled_subset_the_validation_images_leave_the_training_set(tmp_path):
    data = load_data(tiny_config(tmp_path, train_subset=None, val_n=VAL_N))
    assert len(data.train_y) == 60_000 - VAL_N and data.num_train == 60_000 - VAL_N
    assert not _images(data.val_x) & _images(data.train_x)


def test_pre_training_and_teacher_hold_the_validation_images_out_too(tmp_path):
    cfg = tiny_config(tmp_path, method="aft", val_n=VAL_N,
                      pretrain={"epochs": 1, "extra_data": "pseudo-label", "extra_data_n": 64})
    pre = pretrain_config(cfg)
    assert pre.val_n == VAL_N and teacher_config(pre).val_n == VAL_N


@pytest.mark.parametrize("overrides, message", [
    ({"val_n": -1}, "val_n must be >= 0"),
    ({"train_subset": 59_900, "val_n": 200}, r"train_subset \+ extra_data_n \+ val_n = 60100 "
                                             "exceeds the 60000 training images"),
    ({"train_subset": None, "val_n": 60_000}, "leaves none of the 60000 training images"),
    ({"dataset": "imagenet", "train_subset": None, "val_n": 10},
     "val_n is not supported for the streamed dataset"),
])
def test_a_bad_validation_split_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_data(tiny_config(tmp_path, **overrides))
    assert "\n" not in str(info.value)


def test_the_split_needs_no_new_hash_while_off():
    assert build_config(("test", {"val_n": 0})).config_hash() == build_config().config_hash()
    assert build_config(("test", {"val_n": 1000})).config_hash() != build_config().config_hash()
