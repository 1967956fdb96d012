"""Pins baselines/free_at.py: one zero-initialised δ carried across minibatches and epochs, m
replays per minibatch that are all optimiser steps, δ inside the ε-ball with step size ε, the
weights stepped with the gradient at the OLD δ, and a resume that matches an uninterrupted run."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.free_at import FreeAT, FreeSettings
from paper_repro.config import build_config
from paper_repro.data import ArrayLoader
from paper_repro.errors import ConfigError, DataError
from paper_repro.training.methods import Context, get_method
from paper_repro.models import create_model
from paper_repro.training.schedules import make_schedule

EPS = 8 / 255


def _images(n: int, size: int = 16, low: int = 64, high: int = 192, seed: int = 0):
    """uint8 images; pixels in [64, 191] keep x + δ inside [0,1], so δ = input − x exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(low, high, (n, 1, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _setup(*, n=40, batch=16, epochs=2, replays=3, model=None, images=None, **overrides):
    cfg = build_config(("free_at recipe", FreeAT.recipe),
                       ("test", {"arch": "cnn-small", "batch_size": batch, "epochs": epochs,
                                 "eps": EPS, **overrides}),
                       method="free_at", method_args={"replays": replays})
    method = FreeAT(cfg)
    if model is None:
        torch.manual_seed(0)
        model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    x, y = images if images is not None else _images(n)
    loader = ArrayLoader(x, y, batch_size=batch, shuffle=True, drop_last=False, seed=0)
    ctx = Context(model=model, optimizers=method.make_optimizers(model),
                  schedule=make_schedule(cfg.schedule, base_lr=cfg.lr, epochs=cfg.epochs,
                                         **cfg.schedule_args),
                  loader=loader, cfg=cfg, device=torch.device("cpu"), epoch=0,
                  steps_per_epoch=method.optimizer_steps_per_epoch(len(loader)))
    return method, ctx


def _run_epoch(method: FreeAT, ctx: Context, epoch: int) -> dict[str, float]:
    """What the runner does around train_epoch."""
    ctx.epoch = epoch
    torch.manual_seed(100 + epoch)
    ctx.loader.set_epoch(epoch)
    return method.train_epoch(ctx)


class _RecordingModel(nn.Module):
    """Records every input the method feeds the network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


class _RecordingLoader:
    """Records each batch together with the δ buffer as it stands when the batch starts."""

    def __init__(self, loader: ArrayLoader, method: FreeAT) -> None:
        self.loader, self.method, self.seen = loader, method, []

    def __iter__(self):
        for batch in self.loader:
            delta = None if self.method.delta is None else self.method.delta.clone()
            self.seen.append((batch, delta))
            yield batch

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)


def _recorded_run(epochs=2, replays=3, **kw):
    torch.manual_seed(0)
    model = _RecordingModel(create_model("cnn-small", num_classes=10, in_channels=1, width=4))
    method, ctx = _setup(replays=replays, model=model, epochs=epochs, **kw)
    ctx.loader = _RecordingLoader(ctx.loader, method)
    ends = []
    for epoch in range(epochs):
        _run_epoch(method, ctx, epoch)
        ends.append(method.delta.clone())
    return method, ctx, model.inputs, ctx.loader.seen, ends


# --- the persistent perturbation -------------------------------------------------------------

def test_delta_is_zero_once_then_carried_across_batches_and_epochs():
    replays = 3
    method, ctx, inputs, seen, ends = _recorded_run(replays=replays)  # 40 images: 16, 16, 8
    batches_per_epoch = 3
    assert len(seen) == 2 * batches_per_epoch and len(inputs) == replays * len(seen)
    assert seen[0][1] is None  # made lazily at the first batch ...
    first_batch = seen[0][0]
    torch.testing.assert_close(inputs[0], first_batch.x)  # ... and zero there
    assert method.delta.shape == (16, 1, 16, 16)  # batch shape (cfg.batch_size rows)
    for k in range(1, len(seen)):
        batch, carried = seen[k]
        b = len(batch.y)
        assert carried.abs().sum() > 0, f"batch {k} starts from a re-zeroed δ"
        used = inputs[k * replays] - batch.x  # the δ of this batch's first forward
        torch.testing.assert_close(used, carried[:b], atol=1e-6, rtol=0)
    # Across the epoch boundary: epoch 1's first batch starts from δ as epoch 0 left it.
    torch.testing.assert_close(seen[batches_per_epoch][1], ends[0], atol=0, rtol=0)


def test_partial_last_batch_uses_and_writes_back_only_its_slice():
    method, ctx, inputs, seen, ends = _recorded_run(epochs=1)
    last_batch, before = seen[2]
    b = len(last_batch.y)
    assert b == 8
    torch.testing.assert_close(ends[0][b:], before[b:], atol=0, rtol=0)  # rows b: untouched
    assert not torch.equal(ends[0][:b], before[:b])  # rows :b updated by the replays


def test_delta_stays_in_the_eps_ball_and_steps_by_eps():
    x, y = _images(40, low=0, high=256, seed=3)  # full pixel range: the forward clamp matters
    torch.manual_seed(0)
    model = _RecordingModel(create_model("cnn-small", num_classes=10, in_channels=1, width=4))
    method, ctx = _setup(model=model, images=(x, y), replays=4)
    ctx.loader = _RecordingLoader(ctx.loader, method)
    for epoch in range(2):
        _run_epoch(method, ctx, epoch)
        assert method.delta.abs().max() <= EPS + 1e-7
    for _, delta in ctx.loader.seen[1:]:
        assert delta.abs().max() <= EPS + 1e-7
        # From zero, with step ε and clipping to ±ε, every entry is −ε, 0 or +ε.
        levels = torch.tensor([-EPS, 0.0, EPS])
        assert torch.isclose(delta[..., None], levels, atol=1e-6).any(-1).all()
    for inp in model.inputs:  # x + δ is clamped to the image box in the forward
        assert inp.min() >= 0 and inp.max() <= 1


# --- replays are optimiser steps ---------------------------------------------------------------

def test_each_minibatch_is_replayed_m_times_and_every_replay_is_a_step():
    method, ctx = _setup(replays=3, epochs=2)  # 3 minibatches per epoch
    assert ctx.steps_per_epoch == 9
    _run_epoch(method, ctx, 0)
    assert ctx.global_step == 9
    _run_epoch(method, ctx, 1)
    assert ctx.global_step == 18
    # The schedule counts replayed steps: LR 0.1 → 0.01 → 0.001 at 50% / 75% of 18 steps.
    expected = [0.1] * 9 + [0.01] * 5 + [0.001] * 4
    assert ctx.lr_log == pytest.approx(expected)
    assert FreeAT(build_config(method="free_at")).optimizer_steps_per_epoch(390) == 8 * 390


def test_max_steps_stops_inside_the_replays():
    method, ctx = _setup(replays=3, max_steps=5)
    _run_epoch(method, ctx, 0)
    assert ctx.global_step == 5


# --- the update rule -----------------------------------------------------------------------

def test_weights_step_with_the_gradient_at_the_old_delta():
    """Hand computation on a linear model: δ and θ from the same backward, θ at the old δ."""
    lr, replays, n = 0.5, 2, 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 10))
    method, ctx = _setup(n=n, batch=n, replays=replays, model=model, momentum=0.0,
                         weight_decay=0.0, schedule_args={"milestones": []}, lr=lr)
    delta0 = torch.empty(n, 1, 16, 16).uniform_(-EPS, EPS)
    method.load_state_dict({"delta": delta0})
    w0, b0 = (p.detach().clone() for p in model[1].parameters())
    ctx.loader.set_epoch(0)
    x, y = next(iter(ctx.loader))[:2]

    def grads(w, b, d):
        d = d.clone().requires_grad_(True)
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = F.cross_entropy(F.linear((x + d).clamp(0, 1).flatten(1), w, b), y)
        return torch.autograd.grad(loss, (w, b, d))

    w, b, d = w0, b0, delta0
    for _ in range(replays):
        gw, gb, gd = grads(w, b, d)
        w, b = w - lr * gw, b - lr * gb           # θ with the gradient at the old δ
        d = (d + EPS * gd.sign()).clamp(-EPS, EPS)  # δ ascent with step ε, projection
    # The rejected variant: θ stepped with the gradient at the new δ (first replay).
    gw0, _, gd0 = grads(w0, b0, delta0)
    gw_new, _, _ = grads(w0, b0, (delta0 + EPS * gd0.sign()).clamp(-EPS, EPS))
    assert not torch.allclose(gw0, gw_new, atol=1e-5)

    _run_epoch(method, ctx, 0)
    torch.testing.assert_close(model[1].weight.detach(), w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model[1].bias.detach(), b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(method.delta, d, atol=1e-7, rtol=0)


# --- resume ----------------------------------------------------------------------------------

def test_state_dict_round_trip_is_a_copy():
    method, ctx = _setup()
    assert method.state_dict() == {"delta": None}
    _run_epoch(method, ctx, 0)
    state = method.state_dict()
    other = FreeAT(ctx.cfg)
    other.load_state_dict(state)
    torch.testing.assert_close(other.delta, method.delta, atol=0, rtol=0)
    method.delta.zero_()  # the saved state does not alias the live buffer
    assert state["delta"].abs().sum() > 0 and other.delta.abs().sum() > 0


def _checkpoint(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_matches_an_uninterrupted_run():
    method, ctx = _setup()
    for epoch in range(2):
        _run_epoch(method, ctx, epoch)
    straight = {k: v.clone() for k, v in ctx.model.state_dict().items()}

    first, ctx1 = _setup()
    _run_epoch(first, ctx1, 0)
    ckpt = _checkpoint({"model": ctx1.model.state_dict(), "method": first.state_dict(),
                        "optimizers": [o.state_dict() for o in ctx1.optimizers]})

    def resumed(load_method_state: bool) -> dict[str, torch.Tensor]:
        again, ctx2 = _setup()
        ctx2.model.load_state_dict(ckpt["model"])
        for opt, s in zip(ctx2.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(s)
        if load_method_state:
            again.load_state_dict(ckpt["method"])
        ctx2.global_step = ctx1.global_step
        _run_epoch(again, ctx2, 1)
        if load_method_state:
            torch.testing.assert_close(again.delta, method.delta, atol=0, rtol=0)
        return ctx2.model.state_dict()

    for k, v in resumed(True).items():
        torch.testing.assert_close(v, straight[k], atol=0, rtol=0)
    # Control: without δ in the checkpoint the resumed run diverges, so the state is needed.
    without = resumed(False)
    assert any(not torch.equal(without[k], straight[k]) for k in straight)


# --- recipe and registry ---------------------------------------------------------------------

def test_recipe_is_the_reference_one():
    assert get_method("free_at") is FreeAT
    assert FreeSettings().replays == 8
    r = FreeAT.recipe
    assert r["arch"] == "wrn-32-10" and r["batch_size"] == 128
    assert (r["optimizer"], r["lr"], r["momentum"], r["nesterov"]) == ("sgd", 0.1, 0.9, False)
    assert (r["weight_decay"], r["wd_scope"]) == (2e-4, "weights")
    assert r["schedule"] == "piecewise" and r["schedule_args"]["milestones"] == [0.5, 0.75]
    assert (r["augment_pad"], r["augment_pad_mode"], r["augment_flip"]) == (2, "zeros", True)
    # Madry's 80k optimiser steps, replays included: 26 passes x 390 batches x 8 replays.
    assert r["epochs"] * 390 * FreeSettings().replays == 81_120
    with pytest.raises(ConfigError, match="replays"):
        FreeAT(build_config(method="free_at", method_args={"replays": 0}))


def test_runs_end_to_end_through_the_runner(tmp_path):
    from paper_repro.training.runner import train_run

    cfg = build_config(("free_at recipe", FreeAT.recipe),
                       ("tiny", {"dataset": "fashion-mnist", "arch": "cnn-small",
                                 "model_args": {"width": 4}, "train_subset": 128,
                                 "batch_size": 32, "epochs": 1, "eval_n": 50, "monitor_n": 20,
                                 "monitor_steps": 1, "eps": 0.1, "device": "cpu",
                                 "results_dir": str(tmp_path)}),
                       method="free_at", method_args={"replays": 2})
    try:
        record = train_run(cfg, quiet=True)
    except DataError as e:  # as conftest: no data, no end-to-end run
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    assert record["status"] == "done"
    assert record["steps_per_epoch"] == 2 * 4
    assert record["steps_done"] == 2 * 4
