"""Pins baselines/fast_at.py: FGSM-RS with α = 1.25ε in train mode, the reference recipe, the
cyclic LR whose momentum cycles 0.9 → 0.8 → 0.9 in the optimiser as PyTorch's CyclicLR does, and
the catastrophic-overfitting guard (fires on a collapse, restores the previous epoch's weights,
stops; stays quiet otherwise; survives a resume)."""

from __future__ import annotations

import copy

import pytest
import torch

import baselines.fast_at as fast_at
from baselines.fast_at import FastAT, FastSettings
from paper_repro.config import build_config
from paper_repro.data import ArrayLoader
from paper_repro.errors import ConfigError, DataError
from paper_repro.training.methods import Context, get_method
from paper_repro.models import create_model
from paper_repro.training.schedules import make_schedule

EPS = 8 / 255


def _images(n: int, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, 10, (n,), generator=g)


def _setup(*, n=40, batch=16, epochs=2, method_args=None, **overrides):
    cfg = build_config(("fast_at recipe", FastAT.recipe),
                       ("test", {"arch": "cnn-small", "batch_size": batch, "epochs": epochs,
                                 "eps": EPS, **overrides}),
                       method="fast_at", method_args=method_args or {})
    method = FastAT(cfg)
    torch.manual_seed(0)
    model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    loader = ArrayLoader(*_images(n), batch_size=batch, shuffle=True, drop_last=False, seed=0)
    ctx = Context(model=model, optimizers=method.make_optimizers(model),
                  schedule=make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs,
                                         **cfg.schedule_args),
                  loader=loader, cfg=cfg, device=torch.device("cpu"), epoch=0,
                  steps_per_epoch=method.optimizer_steps_per_epoch(len(loader)))
    return method, ctx


def _run_epoch(method: FastAT, ctx: Context, epoch: int) -> dict[str, float]:
    """What the runner does around train_epoch."""
    ctx.epoch = epoch
    torch.manual_seed(100 + epoch)
    ctx.loader.set_epoch(epoch)
    return method.train_epoch(ctx)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


# --- defaults --------------------------------------------------------------------------------

def test_defaults_are_the_reference_recipe():
    assert get_method("fast_at") is FastAT
    s = FastSettings()
    assert (s.alpha_factor, s.early_stop, s.early_stop_drop, s.early_stop_steps) == \
        (1.25, False, 0.2, 5)
    r = FastAT.recipe
    assert (r["arch"], r["epochs"], r["batch_size"]) == ("preact-resnet18", 15, 128)
    assert (r["optimizer"], r["lr"], r["momentum"], r["nesterov"]) == ("sgd", 0.2, 0.9, False)
    assert (r["weight_decay"], r["wd_scope"]) == (5e-4, "all")
    assert (r["augment_pad"], r["augment_pad_mode"], r["augment_flip"]) == (4, "zeros", True)
    cfg = build_config(("fast_at recipe", r), method="fast_at")
    schedule = make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs, **cfg.schedule_args)
    assert cfg.schedule == "cyclic"
    assert schedule.lr(0) == 0 and schedule.lr(7.5) == pytest.approx(0.2)
    assert schedule.momentum(0) == pytest.approx(0.9)
    assert schedule.momentum(7.5) == pytest.approx(0.8)
    assert schedule.momentum(15) == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="alpha_factor"):
        FastAT(build_config(method="fast_at", method_args={"alpha_factor": 0}))


def test_training_uses_fgsm_rs_with_alpha_1_25_eps_in_train_mode(monkeypatch):
    calls = []

    def recording_fgsm_rs(model, x, y, *, eps, alpha=None):
        out = real(model, x, y, eps=eps, alpha=alpha)
        calls.append(dict(eps=eps, alpha=alpha, training=model.training, x=x, x_adv=out))
        return out

    real = fast_at.fgsm_rs
    monkeypatch.setattr(fast_at, "fgsm_rs", recording_fgsm_rs)
    method, ctx = _setup()
    fed = []
    ctx.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].detach().clone()))
    _run_epoch(method, ctx, 0)
    assert len(calls) == len(ctx.loader) == ctx.global_step == 3
    for call in calls:
        assert call["eps"] == EPS and call["alpha"] == pytest.approx(1.25 * EPS)
        assert call["training"]
        assert (call["x_adv"] - call["x"]).abs().max() <= EPS + 1e-6
        assert call["x_adv"].min() >= 0 and call["x_adv"].max() <= 1
        # The update forward is on the FGSM-RS output (the hook also sees the attack forward).
        assert any(torch.equal(f, call["x_adv"]) for f in fed)


# --- the optimiser follows the cyclic schedule, momentum included --------------------------------

def test_momentum_cycles_in_the_optimiser_like_pytorch_cyclic_lr():
    method, ctx = _setup(n=80, batch=16, epochs=2)  # 5 steps per epoch, 10 in all
    seen = []
    ctx.optimizers[0].register_step_pre_hook(
        lambda opt, args, kwargs: seen.append((opt.param_groups[0]["lr"],
                                               opt.param_groups[0]["momentum"])))
    for epoch in range(2):
        _run_epoch(method, ctx, epoch)
    lrs, moms = zip(*seen)
    assert len(seen) == 10
    assert moms[0] == pytest.approx(0.9) and lrs[0] == 0
    peak = lrs.index(max(lrs))
    assert lrs[peak] == pytest.approx(0.2) and moms[peak] == pytest.approx(0.8)
    assert all(a > b for a, b in zip(moms[:peak], moms[1:peak + 1]))  # 0.9 down to 0.8 ...
    assert all(a < b for a, b in zip(moms[peak:], moms[peak + 1:]))  # ... and back up
    assert moms[-1] == pytest.approx(0.9 - 0.1 / 5)  # one step short of 0.9 at the end

    # The reference: torch CyclicLR(base 0, max 0.2, up = down = half the steps), stepped after
    # every optimiser step, with its default momentum cycling 0.8 ↔ 0.9.
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2, step_size_up=5,
                                              step_size_down=5)
    reference = []
    for _ in range(10):
        reference.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        sched.step()
    assert seen == [pytest.approx(r) for r in reference]


# --- the catastrophic-overfitting guard ------------------------------------------------------

def _planted(accuracies, states=None):
    """A guard check that reports the given robust accuracies, epoch after epoch."""
    it = iter(accuracies)

    def check(model, x, y, eps):
        if states is not None:
            states.append(_weights(model))
        return next(it)

    return check


def test_guard_fires_on_a_collapse_and_restores_the_previous_epoch(monkeypatch):
    method, ctx = _setup(epochs=3, method_args={"early_stop": True})
    at_check = []
    monkeypatch.setattr(method, "_robust_accuracy", _planted([0.6, 0.1], at_check))
    stats0 = _run_epoch(method, ctx, 0)
    assert stats0["guard_pgd_acc"] == pytest.approx(60.0) and ctx.stop_reason is None
    after_epoch0 = _weights(ctx.model)
    stats1 = _run_epoch(method, ctx, 1)
    assert stats1["guard_pgd_acc"] == pytest.approx(10.0)
    # Epoch 1 did train (the weights at its check differ) ...
    assert any(not torch.equal(at_check[1][k], after_epoch0[k]) for k in after_epoch0)
    # ... and the guard put epoch 0's weights back and asked the runner to stop.
    _assert_same(_weights(ctx.model), after_epoch0)
    assert ctx.stop_reason is not None and ctx.stop_reason.startswith("catastrophic overfitting")
    assert "0.600" in ctx.stop_reason and "0.100" in ctx.stop_reason


def test_guard_stays_quiet_without_a_drop(monkeypatch):
    method, ctx = _setup(epochs=3, method_args={"early_stop": True})
    monkeypatch.setattr(method, "_robust_accuracy", _planted([0.5, 0.35, 0.3]))  # drops < 0.2
    for epoch in range(3):
        _run_epoch(method, ctx, epoch)
        assert ctx.stop_reason is None
        _assert_same(method.best_state, _weights(ctx.model))  # the copy follows each check
        assert all(v.device.type == "cpu" for v in method.best_state.values())
    assert method.prev_robust_acc == pytest.approx(0.3)


def test_guard_is_off_by_default(monkeypatch):
    method, ctx = _setup()

    def fail(*args):
        raise AssertionError("the guard ran although early_stop is off")

    monkeypatch.setattr(method, "_robust_accuracy", fail)
    stats = _run_epoch(method, ctx, 0)
    assert "guard_pgd_acc" not in stats and method.best_state is None


def test_guard_check_is_pgd5_on_the_epochs_first_minibatch_in_train_mode(monkeypatch):
    calls = []

    def recording_pgd(model, x, y, **kw):
        calls.append(dict(x=x.clone(), y=y.clone(), training=model.training, **kw))
        return real(model, x, y, **kw)

    real = fast_at.pgd
    monkeypatch.setattr(fast_at, "pgd", recording_pgd)
    method, ctx = _setup(method_args={"early_stop": True})
    stats = _run_epoch(method, ctx, 1)
    assert len(calls) == 1
    call = calls[0]
    assert call["steps"] == 5 and call["alpha"] == pytest.approx(EPS / 4)
    assert call["eps"] == EPS and call.get("random_start", True)
    assert call["training"]  # as the reference: batch statistics during the check
    ctx.loader.set_epoch(1)
    first = next(iter(ctx.loader))
    torch.testing.assert_close(call["x"], first.x, atol=0, rtol=0)
    torch.testing.assert_close(call["y"], first.y, atol=0, rtol=0)
    assert 0.0 <= stats["guard_pgd_acc"] <= 100.0
    assert 0.0 <= method.prev_robust_acc <= 1.0  # a fraction, as the 0.2 threshold expects


def test_guard_state_survives_a_resume(monkeypatch):
    method, ctx = _setup(epochs=3, method_args={"early_stop": True})
    monkeypatch.setattr(method, "_robust_accuracy", _planted([0.7]))
    _run_epoch(method, ctx, 0)
    after_epoch0 = _weights(ctx.model)
    state = copy.deepcopy(method.state_dict())

    resumed = FastAT(ctx.cfg)
    resumed.load_state_dict(state)
    assert resumed.prev_robust_acc == pytest.approx(0.7)
    _assert_same(resumed.best_state, after_epoch0)
    monkeypatch.setattr(resumed, "_robust_accuracy", _planted([0.2]))  # a drop of 0.5
    _run_epoch(resumed, ctx, 1)
    assert ctx.stop_reason is not None
    _assert_same(_weights(ctx.model), after_epoch0)


def test_runner_stops_and_keeps_the_restored_weights(tmp_path, monkeypatch):
    from paper_repro.results import run_dir
    from paper_repro.store.files import safe_load
    from paper_repro.training.runner import train_run

    at_check = []

    def check(self, model, x, y, eps):  # 0.5 at the first check, 0.0 at the second
        at_check.append(_weights(model))
        return 0.5 if len(at_check) == 1 else 0.0

    monkeypatch.setattr(FastAT, "_robust_accuracy", check)
    cfg = build_config(("fast_at recipe", FastAT.recipe),
                       ("tiny", {"dataset": "fashion-mnist", "arch": "cnn-small",
                                 "model_args": {"width": 4}, "train_subset": 128,
                                 "batch_size": 32, "epochs": 3, "eval_n": 50, "monitor_n": 20,
                                 "monitor_steps": 1, "eps": 0.1, "device": "cpu",
                                 "results_dir": str(tmp_path)}),
                       method="fast_at", method_args={"early_stop": True})
    try:
        record = train_run(cfg, quiet=True)
    except DataError as e:  # as conftest: no data, no end-to-end run
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    assert record["status"] == "done"
    assert record["epochs_done"] == 2 and record["steps_done"] == 2 * 4
    assert record["stopped_early"].startswith("catastrophic overfitting")
    saved = safe_load(run_dir(tmp_path, cfg.run_path) / "checkpoint.pt")["model"]
    _assert_same({k: v.cpu() for k, v in saved.items()}, at_check[0])

