"""Pins baselines/yopo.py: layer-one-only inner steps, gradients summed over the m passes plus
layer one's Hamiltonian term, η in the ε-ball and the image box, one step of both optimisers per
minibatch, and the 37-epoch multistep recipe (baselines_spec.md §6, §11.8)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.yopo import YOPO, YOPOSettings, hamiltonian, layer_one_steps
from paper_repro.robustness.attacks import LinfThreat
from paper_repro.config import build_config
from paper_repro.data import ArrayLoader
from paper_repro.errors import ConfigError
from paper_repro.training.methods import Context, get_method
from paper_repro.models import create_model
from paper_repro.training.schedules import make_schedule

EPS = 0.1


class RecordingContext(Context):
    """Records every parameter's gradient just before each optimiser step."""

    def step(self, optimizers=None) -> None:
        self.grads_at_step = getattr(self, "grads_at_step", [])
        self.grads_at_step.append({n: p.grad.detach().clone()
                                   for n, p in self.model.named_parameters()})
        super().step(optimizers)


def _setup(n: int = 8, batch: int = 8, **method_args):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    images[:, :, 0, :] = 0  # black and white pixels, so the unclamped start leaves [0,1]
    images[:, :, 1, :] = 255
    labels = torch.randint(0, 10, (n,))
    cfg = build_config(("recipe", YOPO.recipe),
                       ("test", dict(arch="cnn-small", epochs=1, batch_size=batch, eps=EPS,
                                     lr=0.05, augment_pad=0, augment_flip=False,
                                     method_args=method_args)),
                       method="yopo")
    method = YOPO(cfg)
    model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    loader = ArrayLoader(images, labels, batch_size=batch, shuffle=False)
    optimizers = method.make_optimizers(model)
    ctx = RecordingContext(model=model, optimizers=optimizers,
                           schedule=make_schedule("constant", base_lr=cfg.lr, epochs=1),
                           loader=loader, cfg=cfg, device=torch.device("cpu"), epoch=0,
                           steps_per_epoch=len(loader))
    return method, model, ctx, images, labels


def test_registered_with_reference_recipe() -> None:
    assert get_method("yopo") is YOPO
    assert YOPOSettings() == YOPOSettings(passes=5, inner_steps=3, sigma=None)
    r = YOPO.recipe
    assert (r["arch"], r["epochs"], r["batch_size"], r["lr"]) == ("wrn-34-10", 37, 256, 0.08)
    assert r["lr"] == pytest.approx(0.1 * 4 / YOPOSettings().passes)
    assert (r["momentum"], r["weight_decay"], r["wd_scope"]) == (0.9, 5e-4, "all")
    with pytest.raises(ConfigError, match="passes"):
        YOPOSettings(passes=0)


def test_schedule_drops_at_epochs_30_34_36_of_37() -> None:
    """The reference's MultiStepLR [30, 34, 36] over 37 epochs, stepped per epoch."""
    r = YOPO.recipe
    schedule = make_schedule(r["schedule"], base_lr=r["lr"], epochs=r["epochs"],
                             **r["schedule_args"])
    for epoch in range(37):  # 0-indexed; the reference's epoch e is our e - 1
        expected = 0.08 * 0.1 ** sum(epoch >= m for m in (30, 34, 36))
        for t in (epoch, epoch + 0.5, epoch + 0.999):
            assert schedule.lr(t) == pytest.approx(expected, rel=1e-9), (epoch, t)
    assert schedule.lr(29.99) == pytest.approx(0.08) and schedule.lr(36.5) == pytest.approx(8e-5)


def test_two_optimisers_split_layer_one_from_the_rest() -> None:
    _, model, ctx, _, _ = _setup()
    layer_one_opt, other_opt = ctx.optimizers
    first = {id(p) for g in layer_one_opt.param_groups for p in g["params"]}
    rest = {id(p) for g in other_opt.param_groups for p in g["params"]}
    assert first == {id(p) for p in model.stem.parameters()}
    assert first.isdisjoint(rest) and first | rest == {id(p) for p in model.parameters()}
    for opt in ctx.optimizers:
        assert isinstance(opt, torch.optim.SGD)
        for g in opt.param_groups:
            assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.9, 5e-4)


def test_inner_steps_run_layer_one_only() -> None:
    """Per minibatch: m full passes reach the classifier; layer one runs m·(1 + n + 1) times."""
    m, n = 3, 2
    method, model, ctx, _, _ = _setup(n=16, batch=8, passes=m, inner_steps=n)
    calls = {"stem": 0, "body": 0, "classifier": 0}
    for name in calls:
        module = getattr(model.net, name)
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    method.train_epoch(ctx)
    batches = 2
    assert calls["classifier"] == calls["body"] == m * batches
    assert calls["stem"] == m * (n + 2) * batches


def test_gradients_sum_the_m_passes_plus_layer_one_hamiltonian() -> None:
    """The single step uses Σ_j ∇θ CE(f(x+η_j)) for every layer, plus, for layer one,
    Σ_j ∇θ₀ ⟨f₀(clamp(x+η_{j+1})), ∂L_j/∂z₀⟩ (the backward of −H at the new η)."""
    m, n = 2, 2
    method, model, ctx, _, labels = _setup(passes=m, inner_steps=n)
    start = copy.deepcopy(model)
    full_inputs, stem_inputs = [], []
    model.register_forward_pre_hook(lambda _m, args: full_inputs.append(args[0].detach().clone()))
    model.stem.register_forward_pre_hook(
        lambda _m, args: stem_inputs.append(args[0].detach().clone()))
    method.train_epoch(ctx)
    assert len(ctx.grads_at_step) == 1 and len(full_inputs) == m

    start.train()
    expected = {name: torch.zeros_like(p) for name, p in start.named_parameters()}
    hamiltonian_part = torch.zeros_like(start.stem.weight)
    for j, u in enumerate(full_inputs):
        z0 = {}
        start.stem.register_forward_hook(lambda _m, _i, out: z0.__setitem__("z", out))
        loss = F.cross_entropy(start(u), labels)
        names, params = zip(*start.named_parameters())
        *grads, g_z0 = torch.autograd.grad(loss, [*params, z0["z"]])
        start.stem._forward_hooks.clear()
        for name, g in zip(names, grads):
            expected[name] += g
        v = stem_inputs[j * (n + 2) + n + 1]  # the Hamiltonian call after the n inner steps
        (g_w,) = torch.autograd.grad((start.stem(v) * g_z0).sum(), start.stem.weight)
        expected["net.stem.weight"] += g_w
        hamiltonian_part += g_w
    got = ctx.grads_at_step[0]
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)
    # the Hamiltonian term is really there: layer one's gradient is not the CE sum alone
    assert hamiltonian_part.abs().max() > 1e-4
    ce_only = expected["net.stem.weight"] - hamiltonian_part
    assert not torch.allclose(got["net.stem.weight"], ce_only, atol=1e-5)


def test_eta_stays_in_eps_ball_and_image_box() -> None:
    m, n = 3, 3
    method, model, ctx, images, _ = _setup(passes=m, inner_steps=n)
    x = images.float() / 255
    full_inputs, stem_inputs = [], []
    model.register_forward_pre_hook(lambda _m, args: full_inputs.append(args[0].detach().clone()))
    model.stem.register_forward_pre_hook(
        lambda _m, args: stem_inputs.append(args[0].detach().clone()))
    method.train_epoch(ctx)
    tol = 1e-6
    first = full_inputs[0] - x  # η ~ U(−ε, ε), not clamped: x+η may leave [0,1]
    assert first.abs().max() <= EPS + tol
    assert full_inputs[0].min() < 0 and full_inputs[0].max() > 1
    for u in full_inputs[1:] + stem_inputs[1:]:  # every input after the first inner step
        assert (u - x).abs().max() <= EPS + tol
        assert u.min() >= 0 and u.max() <= 1


def test_inner_step_ascends_the_linearised_loss() -> None:
    """p = −∂L/∂z₀ and η ← η − σ·sign ∂H/∂η: ⟨f₀(x+η), ∂L/∂z₀⟩ = −H increases."""
    torch.manual_seed(1)
    stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    x = torch.rand(4, 1, 8, 8)
    p = torch.randn(4, 4, 8, 8)
    eta = torch.zeros_like(x)
    before = -hamiltonian(stem, x, eta, p)
    after_eta = layer_one_steps(stem, x, eta, p, threat=LinfThreat(EPS), sigma=EPS / 4, steps=3)
    after = -hamiltonian(stem, x, after_eta, p)
    assert after > before
    assert after_eta.abs().max() <= EPS + 1e-6 and stem.weight.grad is None


def test_one_step_per_minibatch_for_both_optimisers() -> None:
    method, model, ctx, _, _ = _setup(n=24, batch=8, passes=2, inner_steps=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    method.train_epoch(ctx)
    assert ctx.global_step == 3 and len(ctx.lr_log) == 3 and len(ctx.grads_at_step) == 3
    for opt in ctx.optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                assert "momentum_buffer" in opt.state[p]
    assert not torch.equal(model.net.stem.weight, before["net.stem.weight"])
    assert not torch.equal(model.net.classifier.weight, before["net.classifier.weight"])


def test_runs_end_to_end_through_the_runner(tmp_path) -> None:
    from paper_repro.training.runner import train_run
    cfg = build_config(("recipe", YOPO.recipe),
                       ("smoke", dict(dataset="fashion-mnist", train_subset=128, epochs=1,
                                      batch_size=64, arch="cnn-small", model_args={"width": 4},
                                      eps=0.1, eval_n=50, monitor_n=20, monitor_steps=1,
                                      eval_steps=2, device="cpu", results_dir=str(tmp_path),
                                      method_args={"passes": 2, "inner_steps": 2})),
                       method="yopo")
    record = train_run(cfg, quiet=True)
    assert record["status"] == "done" and record["steps_done"] == 2
