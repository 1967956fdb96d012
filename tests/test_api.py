"""api.py: `paper_repro.finetune` is AFT on any model and any DataLoader, through the method's
own epoch and the one PGD."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paper_repro.training import adversarial
import paper_repro
from paper_repro.api import _accuracy, _Batches
from paper_repro.errors import ConfigError

EPS = 0.1


def _toy_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by which half of an 8x8 image is brighter (by 0.3 > 2ε)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2 + 0.4
    sign = torch.where(y == 0, 1.0, -1.0).view(-1, 1, 1, 1) * 0.15
    x[..., :4] += sign
    x[..., 4:] -= sign
    return x, y


def _plain_model() -> nn.Module:
    """Not an ImageClassifier: any module taking [0,1] images."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 2))


def _train_pgd_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    batches = _Batches([(x, y)], torch.device("cpu"), "train set")
    return _accuracy(model, batches, eps=EPS, alpha=EPS / 4, steps=10)["pgd_acc"]


def test_finetune_trains_adversarially_and_returns_per_epoch_metrics(monkeypatch):
    x, y = _toy_data()
    model = _plain_model()
    before = _train_pgd_acc(model, x, y)
    attacks = []
    real_pgd = adversarial.pgd

    def spy(model_, x_, y_, **kw):  # the method's own attack call, counted
        attacks.append(kw)
        return real_pgd(model_, x_, y_, **kw)

    monkeypatch.setattr(adversarial, "pgd", spy)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    tuned, metrics = paper_repro.finetune(model, loader, epsilon=EPS, epochs=2, lr=0.05, steps=5,
                                          eval_loader=[(x[:64], y[:64])], eval_steps=3, seed=0)
    assert tuned is model and not model.training
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"lr", "train_loss", "train_adv_acc", "clean_acc", "pgd_acc", "time_s"} <= set(m)
    # every training batch went through the method's epoch: PGD-5 at ε, α = ε/4 (AFT's default)
    assert len(attacks) == 2 * len(loader)
    assert all(a["eps"] == EPS and a["alpha"] == pytest.approx(EPS / 4) and a["steps"] == 5
               for a in attacks)
    # the slow start: the first epoch starts at 5% of the peak LR
    assert metrics[0]["lr"] == pytest.approx(0.05 * 0.05)
    assert _train_pgd_acc(model, x, y) > before + 20


def test_finetune_refuses_normalised_images_and_generators():
    x, y = _toy_data(64)
    with pytest.raises(ConfigError, match=r"images must be in \[0,1\]"):
        paper_repro.finetune(_plain_model(), [((x - 0.5) / 0.2, y)], epsilon=EPS, epochs=1)
    with pytest.raises(ConfigError, match="needs len"):
        paper_repro.finetune(_plain_model(), ((x, y) for _ in range(2)), epsilon=EPS, epochs=1)
    with pytest.raises(ConfigError, match="eps must be in"):
        paper_repro.finetune(_plain_model(), [(x, y)], epsilon=8, epochs=1)
