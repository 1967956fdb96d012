"""attacks.py: the one PGD. Invariants the whole suite relies on."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from paper_repro.robustness.attacks import LinfThreat, fgsm_rs, pgd

EPS = 0.1


def _batch(fashion_test, n=256):
    x, y = fashion_test
    return x[:n].float() / 255, y[:n]


def test_pgd_stays_in_eps_ball_and_image_box(trained_model, fashion_test):
    x, y = _batch(fashion_test)
    for steps, alpha in [(1, 1.25 * EPS), (10, EPS / 4), (5, 0.5)]:  # 0.5: steps far outside ε
        x_adv = pgd(trained_model, x, y, eps=EPS, alpha=alpha, steps=steps)
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_random_start_is_uniform_in_ball_and_clamped():
    x = torch.rand(64, 1, 8, 8)
    x[:, :, 0, 0] = 0.0  # pixels at the box's edge must be moved inside
    delta = LinfThreat(EPS).random_start(x)
    assert delta.abs().max() <= EPS
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    assert delta[:, :, 1:, 1:].std() > EPS / 3  # spread over the ball, not a point


def test_update_order_is_step_then_project_then_clamp():
    threat = LinfThreat(0.1)
    x = torch.tensor([0.95, 0.5, 0.02])
    delta = torch.tensor([0.08, -0.09, 0.0])
    grad = torch.tensor([1.0, -1.0, -1.0])
    out = threat.clamp_to_image(x, threat.project(threat.step(delta, grad, 0.05)))
    # 0.08+0.05 -> projected to 0.1 -> clamped to 1-0.95; -0.14 -> -0.1; -0.05 -> clamped to -0.02
    assert torch.allclose(out, torch.tensor([0.05, -0.1, -0.02]))


def test_strength_ordering_on_a_trained_model(trained_model, fashion_test):
    """loss(PGD-10) >= loss(FGSM-RS) >= loss(clean), and accuracy falls in that order."""
    torch.manual_seed(0)
    x, y = _batch(fashion_test, 512)
    with torch.no_grad():
        clean = trained_model(x)
    x_fgsm = fgsm_rs(trained_model, x, y, eps=EPS)
    x_pgd = pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=10)
    with torch.no_grad():
        fgsm, strong = trained_model(x_fgsm), trained_model(x_pgd)
    losses = [F.cross_entropy(o, y).item() for o in (clean, fgsm, strong)]
    accs = [(o.argmax(1) == y).float().mean().item() for o in (clean, fgsm, strong)]
    assert losses[2] >= losses[1] >= losses[0]
    assert accs[0] > accs[1] >= accs[2]
    assert accs[0] > 0.7  # the model is trained, so the ordering means something


def test_attack_touches_no_parameter_gradient(trained_model, fashion_test):
    x, y = _batch(fashion_test, 64)
    for p in trained_model.parameters():
        p.grad = None
    pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=3)
    assert all(p.grad is None for p in trained_model.parameters())
    assert all(p.requires_grad for p in trained_model.parameters())  # unfrozen afterwards
    # existing gradients stay exactly as they were
    sentinel = [torch.full_like(p, 7.0) for p in trained_model.parameters()]
    for p, s in zip(trained_model.parameters(), sentinel):
        p.grad = s.clone()
    fgsm_rs(trained_model, x, y, eps=EPS)
    assert all(torch.equal(p.grad, s) for p, s in zip(trained_model.parameters(), sentinel))
    for p in trained_model.parameters():
        p.grad = None


def test_attack_leaves_model_mode_to_the_caller(trained_model, fashion_test):
    x, y = _batch(fashion_test, 16)
    trained_model.train()
    pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=1)
    assert trained_model.training
    trained_model.eval()
    pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=1)
    assert not trained_model.training


def test_given_delta_is_the_start_and_no_random_start_is_deterministic(trained_model, fashion_test):
    x, y = _batch(fashion_test, 32)
    a = pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=2, random_start=False)
    b = pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=2, random_start=False)
    assert torch.equal(a, b)
    start = torch.full_like(x, 0.3)  # outside the ball: projected first
    c = pgd(trained_model, x, y, eps=EPS, alpha=EPS / 4, steps=0, delta=start)
    assert torch.allclose(c, (x + EPS).clamp(0, 1))
