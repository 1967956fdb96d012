"""Shared fixtures: a small trained model on real Fashion-MNIST, and tiny run configs.

Tests never write into the repository's results/: every run goes to a tmp_path store.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from paper_repro.config import build_config
from paper_repro.data import dataset_info, load_arrays
from paper_repro.errors import DataError
from paper_repro.models import create_model


def _fashion(train: bool):
    try:
        return load_arrays("fashion-mnist", None, train=train)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")


@pytest.fixture(scope="session")
def fashion_test():
    x, y = _fashion(train=False)
    return x[:512], y[:512]


@pytest.fixture(scope="session")
def trained_model(fashion_test):
    """cnn-small trained naturally for a few hundred steps: accurate, not robust."""
    torch.manual_seed(0)
    x, y = _fashion(train=True)
    x, y = x[:4096].float() / 255, y[:4096]
    info = dataset_info("fashion-mnist")
    model = create_model("cnn-small", num_classes=10, in_channels=1, mean=info.mean, std=info.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _epoch in range(3):
        for i in range(0, len(y), 128):
            loss = F.cross_entropy(model(x[i:i + 128]), y[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def doc_example(doc: Path, name: str) -> str:
    """The python block after `<!-- example: NAME (tests/... runs this block) -->` in a doc:
    a doc example another test runs verbatim (tests/test_docs.py skips it)."""
    match = re.search(rf"<!-- example: {re.escape(name)}\b[^>]*-->\s*```python\n(.*?)```",
                      doc.read_text(), re.S)
    assert match, f"{doc.name} lost its {name} example"
    return match.group(1)


def tiny_config(tmp_path, *, method="natural", experiment="test", **overrides):
    """A seconds-long run on real Fashion-MNIST, stored under tmp_path."""
    values = dict(dataset="fashion-mnist", arch="cnn-small", model_args={"width": 4},
                  train_subset=192, batch_size=64, epochs=2, eps=0.1, eval_n=40,
                  eval_steps=3, monitor_n=20, monitor_steps=1, eval_batch=200,
                  aa_n=0,  # AutoAttack is tested in test_evaluation.py; elsewhere it only costs
                  deterministic=True, results_dir=str(tmp_path))
    values.update(overrides)
    from paper_repro.training.methods import get_method
    return build_config(("recipe", get_method(method).recipe), ("test", values),
                        experiment=experiment, row=method, scale="smoke", seed=0, method=method)


# The local pool's default K where a test does not pass --jobs: one (runs in the test's own
# process, where its monkeypatches apply); the pool's tests pass --jobs themselves.
os.environ.setdefault("REPRO_JOBS", "1")
