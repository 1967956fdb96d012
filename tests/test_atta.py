"""Pins baselines/atta.py: the same crop+flip for natural and stored images and its exact inverse,
stored adversarial images carried across epochs and reset on schedule, the attack in eval mode,
the stored images inside the ε-ball, the 1/B loss option, resume, and the 38-epoch schedule
(baselines_spec.md §7, §11.9)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import baselines.atta as atta
from baselines.atta import ATTA, ATTASettings, augment, inverse_augment, pad_images
from paper_repro.config import build_config
from paper_repro.data import ArrayLoader
from paper_repro.errors import ConfigError
from paper_repro.training.methods import Context, get_method
from paper_repro.models import create_model
from paper_repro.training.schedules import make_schedule

EPS = 0.1
SIZE = 8


def _setup(n: int = 16, batch: int = 8, model_seed: int = 0, **method_args):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    cfg = build_config(("recipe", ATTA.recipe),
                       ("test", dict(arch="cnn-small", epochs=10, batch_size=batch, eps=EPS,
                                     lr=0.05, method_args=method_args)),
                       method="atta")
    method = ATTA(cfg)
    torch.manual_seed(model_seed)
    model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    loader = ArrayLoader(images, labels, batch_size=batch, shuffle=False)
    ctx = Context(model=model, optimizers=method.make_optimizers(model),
                  schedule=make_schedule("constant", base_lr=cfg.lr, epochs=cfg.epochs),
                  loader=loader, cfg=cfg, device=torch.device("cpu"), epoch=0,
                  steps_per_epoch=len(loader))
    return method, model, ctx, images


def _run_epoch(method, ctx, epoch: int) -> dict:
    ctx.epoch = epoch
    torch.manual_seed(1000 + epoch)  # the runner seeds every epoch
    return method.train_epoch(ctx)


class Spy:
    """Wraps a module-level function of baselines.atta and records its calls."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.calls: list[tuple] = []
        self.real = getattr(atta, name)
        monkeypatch.setattr(atta, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.real(*args, **kwargs)


def test_registered_with_reference_recipe() -> None:
    assert get_method("atta") is ATTA
    s = ATTASettings()
    assert (s.steps, s.pad, s.pad_value, s.reset_every, s.loss_scale) == (1, 4, 0.5, 10, "mean")
    assert s.alpha(0.031) == pytest.approx(0.015)
    assert s.alpha(8 / 255) == pytest.approx(0.015 / 0.031 * 8 / 255)
    assert ATTASettings(steps=10).alpha(0.031) == pytest.approx(0.007)
    r = ATTA.recipe
    assert (r["arch"], r["epochs"], r["batch_size"], r["lr"], r["weight_decay"]) == \
        ("wrn-34-10", 38, 64, 0.1, 2e-4)
    assert (r["augment_pad"], r["augment_flip"]) == (0, False)
    with pytest.raises(ConfigError, match="step_size"):
        ATTASettings(steps=5)
    with pytest.raises(ConfigError, match="loss_scale"):
        ATTASettings(loss_scale="sum")


def test_refuses_a_loader_that_augments() -> None:
    cfg = build_config(("recipe", ATTA.recipe), ("row", {"augment_pad": 2}), method="atta")
    with pytest.raises(ConfigError, match="augment_pad=0"):
        ATTA(cfg)


def test_schedule_is_0p1_0p01_0p001_on_the_reference_epochs() -> None:
    """0.1 for epochs 1-29, 0.01 for 30-35, 0.001 for 36-38 (1-indexed), per epoch."""
    r = ATTA.recipe
    schedule = make_schedule(r["schedule"], base_lr=r["lr"], epochs=r["epochs"],
                             **r["schedule_args"])
    for epoch in range(1, 39):  # 1-indexed, as the reference; t is 0-indexed
        expected = 0.1 if epoch <= 29 else 0.01 if epoch <= 35 else 0.001
        for t in (epoch - 1, epoch - 0.5, epoch - 0.001):
            assert schedule.lr(t) == pytest.approx(expected, rel=1e-9), (epoch, t)


def test_augment_then_inverse_is_the_identity_and_touches_only_the_window() -> None:
    torch.manual_seed(0)
    pad, b = 4, 6
    padded = torch.rand(b, 3, SIZE + 2 * pad, SIZE + 2 * pad)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2))
    offsets[0] = torch.tensor([0, 2 * pad])  # the extreme corners are reachable
    flips = torch.tensor([True, False, True, False, True, False])
    crop = augment(padded, offsets, flips, (SIZE, SIZE))
    for i in range(b):  # crop at (top, left) = offsets, then flip
        r, c = offsets[i].tolist()
        window = padded[i, :, r:r + SIZE, c:c + SIZE]
        torch.testing.assert_close(crop[i], window.flip(2) if flips[i] else window, rtol=0, atol=0)
    assert torch.equal(inverse_augment(padded, crop, offsets, flips), padded)

    new_crop = torch.rand_like(crop)
    original = padded.clone()
    written = inverse_augment(padded, new_crop, offsets, flips)
    assert torch.equal(padded, original)  # a copy: the input is not modified
    assert torch.equal(augment(written, offsets, flips, (SIZE, SIZE)), new_crop)
    inside = torch.zeros_like(padded, dtype=torch.bool)
    for i in range(b):
        r, c = offsets[i].tolist()
        inside[i, :, r:r + SIZE, c:c + SIZE] = True
    assert torch.equal(written[~inside], padded[~inside])


def test_attack_runs_in_eval_mode_and_update_in_train_mode() -> None:
    method, model, ctx, _ = _setup(steps=3, step_size=0.03)
    modes: list[bool] = []

    class Recorder(nn.Identity):
        def forward(self, x):
            modes.append(self.training)
            return x

    model.normalize = Recorder()
    method.train_epoch(ctx)
    assert modes == [False, False, False, True] * len(ctx.loader)


def test_natural_and_stored_images_get_the_same_crop_and_flip(monkeypatch) -> None:
    spy = Spy(monkeypatch, "augment")
    method, _, ctx, _ = _setup()
    _run_epoch(method, ctx, 0)
    assert len(spy.calls) == 2 * len(ctx.loader)
    for (nat_args, _), (adv_args, _) in zip(spy.calls[::2], spy.calls[1::2]):
        assert torch.equal(nat_args[1], adv_args[1]) and torch.equal(nat_args[2], adv_args[2])


def test_stored_images_carry_over_epochs_and_reset_on_schedule(monkeypatch) -> None:
    """Epoch e starts from the store left by epoch e−1, except when (e+1) % reset_every == 0."""
    resets = Spy(monkeypatch, "fresh_store")
    augments = Spy(monkeypatch, "augment")
    starts = Spy(monkeypatch, "pgd")
    method, _, ctx, images = _setup(reset_every=3, step_size=EPS)  # resets before epochs 2, 5
    natural = pad_images(images, 4, 0.5)
    batches = [torch.arange(i, i + 8) for i in (0, 8)]  # shuffle=False
    for epoch in range(6):
        before = None if method.adv is None else method.adv.clone()
        n_resets = len(resets.calls)
        augments.calls.clear()
        starts.calls.clear()
        _run_epoch(method, ctx, epoch)
        is_reset = epoch == 0 or (epoch + 1) % 3 == 0
        assert len(resets.calls) == n_resets + is_reset, epoch
        for k, index in enumerate(batches):
            (_, offsets, flips, size), _ = augments.calls[2 * k + 1]
            (_, x_nat, _), kwargs = starts.calls[k]
            x_start = x_nat + kwargs["delta"]
            if is_reset:  # natural image + 0.001·N(0,1)
                expected = augment(natural[index], offsets, flips, size)
                assert (x_start - expected).abs().max() < 0.006
            else:  # exactly what the previous epoch stored
                expected = augment(before[index], offsets, flips, size)
                torch.testing.assert_close(x_start, expected, rtol=0, atol=1e-6)
                assert (x_start - x_nat).abs().max() > 0.5 * EPS  # a carried perturbation
    assert [e for e in range(6) if e == 0 or (e + 1) % 3 == 0] == [0, 2, 5]
    assert len(resets.calls) == 3


def test_stored_images_stay_within_eps_of_natural(monkeypatch) -> None:
    augments = Spy(monkeypatch, "augment")
    method, _, ctx, images = _setup(steps=2, step_size=EPS)
    _run_epoch(method, ctx, 0)
    natural = pad_images(images, 4, 0.5)
    diff = method.adv - natural
    assert diff.abs().max() <= EPS + 1e-6
    assert diff.abs().max() > 0.9 * EPS  # the attack moved them
    written = torch.zeros_like(natural, dtype=torch.bool)
    for k, index in enumerate([torch.arange(0, 8), torch.arange(8, 16)]):
        (_, offsets, _, _), _ = augments.calls[2 * k + 1]
        for i, (r, c) in zip(index.tolist(), offsets.tolist()):
            written[i, :, r:r + SIZE, c:c + SIZE] = True
    inside = method.adv[written]
    assert inside.min() >= 0 and inside.max() <= 1
    assert diff[~written].abs().max() < 0.006  # never written: still natural + 0.001-noise


def _grads_of_one_batch(loss_scale: str) -> dict[str, torch.Tensor]:
    method, model, ctx, _ = _setup(n=8, loss_scale=loss_scale)
    captured = {}
    original_step = ctx.step

    def step(optimizers=None):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        original_step(optimizers)

    ctx.step = step
    _run_epoch(method, ctx, 0)
    return captured


def test_reference_loss_scale_divides_the_gradient_by_the_batch_size() -> None:
    mean, reference = _grads_of_one_batch("mean"), _grads_of_one_batch("reference")
    for name, g in mean.items():
        torch.testing.assert_close(reference[name] * 8, g, rtol=1e-5, atol=1e-7)


def test_resume_from_state_dict_matches_uninterrupted_training() -> None:
    method, model, ctx, _ = _setup()
    _run_epoch(method, ctx, 0)
    saved = (copy.deepcopy(model.state_dict()),
             [copy.deepcopy(o.state_dict()) for o in ctx.optimizers],
             {k: v.clone() for k, v in method.state_dict().items()}, ctx.global_step)
    _run_epoch(method, ctx, 1)

    resumed, model2, ctx2, _ = _setup(model_seed=1)
    model2.load_state_dict(saved[0])
    for opt, state in zip(ctx2.optimizers, saved[1]):
        opt.load_state_dict(state)
    resumed.load_state_dict(saved[2])
    ctx2.global_step = saved[3]
    _run_epoch(resumed, ctx2, 1)
    assert torch.equal(resumed.adv, method.adv)
    for (name, p), p2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, p2), name


def test_runs_end_to_end_through_the_runner(tmp_path) -> None:
    from paper_repro.training.runner import train_run
    cfg = build_config(("recipe", ATTA.recipe),
                       ("smoke", dict(dataset="fashion-mnist", train_subset=128, epochs=1,
                                      batch_size=64, arch="cnn-small", model_args={"width": 4},
                                      eps=0.1, eval_n=50, monitor_n=20, monitor_steps=1,
                                      eval_steps=2, device="cpu", results_dir=str(tmp_path),
                                      method_args={"pad": 2, "reset_every": 2})),
                       method="atta")
    record = train_run(cfg, quiet=True)
    assert record["status"] == "done" and record["steps_done"] == 2
