"""Pins baselines/trades.py, mart.py and awp.py and AFT's other objectives (issue 23): each
loss equals a hand computation on a tiny fixed network; TRADES's attack raises its KL term in eval
mode and stays in the ε-ball and [0,1]; AWP's perturbation has relative size γ on every conv/linear
weight, leaves the rest and the BatchNorm statistics alone, and the weights are bit-identical
after it; the warm-up holds AWP back; no attack pass computes a weight gradient (the `bench`
probe); AFT's new settings stay out of the hash at their defaults."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from baselines.awp import ATAWP, TRADESAWP, WeightPerturbation, perturbed_weights
from baselines.mart import MART, MARTObjective, mart_loss
from baselines.trades import TRADES, TRADESObjective, kl_attack, trades_loss
from paper_repro.perf import probes
from baselines.aft import AFT, AFTSettings
from paper_repro.robustness.attacks import per_example_kl
from paper_repro.config import HASH_STABLE_METHOD_ARGS, build_config
from paper_repro.data import ArrayLoader
from paper_repro.errors import ConfigError
from paper_repro.training.methods import Context, get_method
from paper_repro.models import create_model
from paper_repro.training.schedules import make_schedule

EPS = 0.1
NEW_METHODS = ("trades", "mart", "at_awp", "trades_awp")


# --- a tiny fixed network and its hand computation ---------------------------------------------

def _linear() -> nn.Linear:
    """2 inputs, 3 classes, fixed weights."""
    net = nn.Linear(2, 3)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]]))
        net.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    return net


X = torch.tensor([[0.2, 0.7], [0.9, 0.1]])
X_ADV = torch.tensor([[0.3, 0.6], [0.8, 0.2]])
Y = torch.tensor([1, 0])


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _logits(x: list[float]) -> list[float]:
    w, b = [[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]], [0.1, 0.0, -0.2]
    return [sum(wi * xi for wi, xi in zip(row, x)) + bi for row, bi in zip(w, b)]


def _kl(p: list[float], q: list[float], floor: float = 0.0) -> float:
    return sum(pk * (math.log(pk) - math.log(qk + floor)) for pk, qk in zip(p, q))


def test_trades_loss_is_ce_plus_beta_times_the_batchmean_kl():
    beta, n = 6.0, len(Y)
    by_hand = 0.0
    for x, xa, y in zip(X.tolist(), X_ADV.tolist(), Y.tolist()):
        p, q = _softmax(_logits(x)), _softmax(_logits(xa))
        by_hand += (-math.log(p[y]) + beta * _kl(p, q)) / n
    net = _linear()
    loss, logits_adv = TRADESObjective(beta, 10, 0.25).loss(net, X, X_ADV, Y)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    torch.testing.assert_close(logits_adv, net(X_ADV))
    assert trades_loss(net(X), net(X_ADV), Y, 0.0).item() == pytest.approx(
        sum(-math.log(_softmax(_logits(x))[y]) for x, y in zip(X.tolist(), Y.tolist())) / n,
        rel=1e-5)


def test_mart_loss_is_boosted_ce_plus_the_misclassification_weighted_kl():
    beta, n = 6.0, len(Y)
    by_hand = 0.0
    for x, xa, y in zip(X.tolist(), X_ADV.tolist(), Y.tolist()):
        p, q = _softmax(_logits(x)), _softmax(_logits(xa))
        wrong = max((k for k in range(3) if k != y), key=lambda k: q[k])
        boosted = -math.log(q[y]) - math.log(1.0001 - q[wrong] + 1e-12)
        by_hand += (boosted + beta * _kl(p, q, 1e-12) * (1.0000001 - p[y])) / n
    loss, _ = MARTObjective(beta, 10, 0.25).loss(_linear(), X, X_ADV, Y)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    # the weight (1 − p_y) is differentiated too, as in the reference
    net = _linear()
    mart_loss(net(X), net(X_ADV), Y, beta).backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_aft_objectives_are_the_baselines_losses():
    net = _linear()
    for loss, cls in (("trades", TRADESObjective), ("mart", MARTObjective)):
        objective = AFTSettings(loss=loss).objective(EPS)
        assert isinstance(objective, cls) and objective.alpha_factor == 0.25  # AFT's ε/4
        torch.testing.assert_close(objective.loss(net, X, X_ADV, Y)[0],
                                   cls(6.0, 10, 0.25).loss(net, X, X_ADV, Y)[0])
    assert AFTSettings(loss="trades", alpha=0.05).objective(EPS).alpha_factor == pytest.approx(0.5)


# --- TRADES's attack ------------------------------------------------------------------------------

def test_trades_attack_raises_the_kl_in_eval_mode_and_stays_in_the_ball():
    torch.manual_seed(0)
    model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    model.train()
    modes: list[bool] = []
    model.register_forward_hook(lambda m, i, o: modes.append(m.training))
    x = torch.rand(16, 1, 8, 8)
    x[:4] = 0.0  # pixels at the edge of [0,1]
    x[4:8] = 1.0
    x_adv = kl_attack(model, x, EPS, alpha=EPS / 4, steps=10)
    assert modes and not any(modes)  # every forward of the attack in eval mode
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        start = per_example_kl(model(x + 0.001 * torch.randn_like(x)), p).mean()
        after = per_example_kl(model(x_adv), p).mean()
    assert after > 100 * start  # the KL term the attack maximises rose from the start


# --- AWP ------------------------------------------------------------------------------------------

def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("cnn-small", num_classes=10, in_channels=1, width=4)


def _loss_fn(x: torch.Tensor, y: torch.Tensor):
    return lambda m: nn.functional.cross_entropy(m(x), y)


def test_awp_perturbs_every_conv_and_linear_weight_by_gamma_relative_and_restores_exactly():
    model = _bn_model().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    names = perturbed_weights(model)
    params = dict(model.named_parameters())
    assert names and all(params[n].dim() > 1 for n in names)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gamma = 5e-3
    awp = WeightPerturbation(gamma)
    with awp(model, _loss_fn(x, y)):
        inside = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _loss_fn(x, y)(model.eval()).backward()  # eval: this forward leaves the BN statistics
    for k, w in before.items():
        if k in names:
            rel = (inside[k] - w).norm() / w.norm()
            assert rel.item() == pytest.approx(gamma, rel=1e-4), k
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(inside[k], w), k  # biases, BN weights and BN statistics untouched
    after = model.state_dict()
    for k, w in before.items():
        assert torch.equal(after[k], w), k  # bit-identical after removal
    # the update's gradient is taken at the perturbed weights
    model.zero_grad()
    _loss_fn(x, y)(model).backward()
    g0 = params[names[0]].grad.clone()
    model.zero_grad()
    with awp(model, _loss_fn(x, y)):
        _loss_fn(x, y)(model).backward()
    assert not torch.equal(params[names[0]].grad, g0)


def test_awp_ascends_the_inner_loss():
    model = _bn_model().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        base = _loss_fn(x, y)(model)
    with awp_applied(model, _loss_fn(x, y)), torch.no_grad():
        perturbed = _loss_fn(x, y)(model)
    assert perturbed > base


def awp_applied(model, loss_fn):
    return WeightPerturbation(0.05)(model, loss_fn)


# --- whole epochs: warm-up, probe -----------------------------------------------------------------

def _setup(method: str, n: int = 16, batch: int = 8, **method_args):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    cls = get_method(method)
    cfg = build_config(("recipe", cls.recipe),
                       ("test", dict(arch="cnn-small", epochs=4, batch_size=batch, eps=EPS,
                                     lr=0.05, method_args=method_args, pretrain=None)),
                       method=method)
    m = cls(cfg)
    torch.manual_seed(1)
    model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    loader = ArrayLoader(images, labels, batch_size=batch, shuffle=False)
    ctx = Context(model=model, optimizers=m.make_optimizers(model),
                  schedule=make_schedule("constant", base_lr=cfg.lr, epochs=cfg.epochs),
                  loader=loader, cfg=cfg, device=torch.device("cpu"), epoch=0,
                  steps_per_epoch=len(loader))
    return m, ctx


def _run_epoch(method, ctx, epoch: int) -> dict:
    ctx.epoch = epoch
    torch.manual_seed(1000 + epoch)
    return method.train_epoch(ctx)


@pytest.mark.parametrize("method", ["at_awp", "trades_awp"])
def test_awp_starts_after_its_warm_up(method, monkeypatch):
    m, ctx = _setup(method, warmup=1)
    calls: list[int] = []
    direction = WeightPerturbation.direction
    monkeypatch.setattr(WeightPerturbation, "direction",
                        lambda self, *a: calls.append(ctx.epoch) or direction(self, *a))
    _run_epoch(m, ctx, 0)
    assert calls == []
    _run_epoch(m, ctx, 1)
    assert calls == [1, 1]  # once per minibatch


@pytest.mark.parametrize("method,args", [
    ("trades", {}), ("mart", {}), ("at_awp", {}), ("trades_awp", {"warmup": 0}),
    ("aft", {"loss": "trades", "awp": True}), ("aft", {"loss": "mart"})])
def test_attack_passes_compute_no_weight_gradients(method, args):
    m, ctx = _setup(method, **args)
    with probes.probing_attacks(ctx.model) as probe:
        stats = _run_epoch(m, ctx, 0)
    assert math.isfinite(stats["train_loss"]) and ctx.global_step == 2
    assert probe.attack_calls >= 2 * 10  # PGD-10 per minibatch
    assert not probe.wgrad_ops and probe.grads_touched == 0


# --- defaults, recipes, settings -----------------------------------------------------------------

def test_registry_and_reference_recipes():
    assert [get_method(n) for n in NEW_METHODS] == [TRADES, MART, ATAWP, TRADESAWP]
    t, m, a, ta = TRADES.Settings(), MART.Settings(), ATAWP.Settings(), TRADESAWP.Settings()
    assert (t.beta, t.steps, t.alpha_factor * 0.031) == (6.0, 10, pytest.approx(0.007))
    assert (m.beta, m.steps, m.alpha_factor * 0.031) == (6.0, 10, pytest.approx(0.007))
    assert (a.gamma, a.warmup, a.steps, a.alpha, a.bn_mode) == (0.01, 0, 10, None, "train")
    assert (ta.gamma, ta.warmup, ta.beta, ta.alpha_factor) == (5e-3, 9, 6.0, 0.25)
    recipes = {n: get_method(n).recipe for n in NEW_METHODS}
    assert {n: (r["arch"], r["epochs"], r["weight_decay"]) for n, r in recipes.items()} == {
        "trades": ("wrn-34-10", 76, 2e-4), "mart": ("wrn-34-10", 90, 7e-4),
        "at_awp": ("wrn-34-10", 200, 5e-4), "trades_awp": ("wrn-34-10", 200, 5e-4)}
    for name, epochs, lrs in (("trades", 76, {0: 0.1, 73: 0.1, 74: 0.01, 75: 0.01}),
                              ("mart", 90, {73: 0.1, 74: 0.01, 88: 0.01, 89: 0.001}),
                              ("trades_awp", 200, {98: 0.1, 99: 0.01, 149: 0.001})):
        r = recipes[name]
        schedule = make_schedule(r["schedule"], base_lr=r["lr"], epochs=epochs,
                                 **r["schedule_args"])
        assert {e: pytest.approx(schedule.lr(e + 0.5)) for e in lrs} == lrs, name
    assert all(not r["drop_last"] for r in recipes.values())


def test_settings_are_checked():
    for method, args, message in (("trades", {"beta": -1.0}, "beta must be >= 0"),
                                  ("mart", {"steps": 0}, "steps must be >= 1"),
                                  ("at_awp", {"gamma": -0.1}, "gamma must be >= 0"),
                                  ("aft", {"loss": "kl"}, "loss must be one of"),
                                  ("aft", {"loss": "mart", "awp": True}, "set method_args.gamma")):
        with pytest.raises(ConfigError, match=message):
            get_method(method)(build_config(("t", {"method_args": args}), method=method))


def test_aft_new_settings_stay_out_of_the_hash_at_their_defaults():
    defaults = AFTSettings()
    assert {k: getattr(defaults, k) for k in HASH_STABLE_METHOD_ARGS["aft"]} == \
        HASH_STABLE_METHOD_ARGS["aft"]
    plain = build_config(("aft", AFT.recipe), method="aft")
    explicit = build_config(("aft", AFT.recipe), method="aft",
                            method_args=dict(HASH_STABLE_METHOD_ARGS["aft"]))
    assert plain.config_hash() == explicit.config_hash()
    for args in ({"loss": "trades"}, {"awp": True}, {"beta": 3.0}):
        assert build_config(("aft", AFT.recipe), method="aft",
                            method_args=args).config_hash() != plain.config_hash()


# --- the modern experiment ----------------------------------------------------------------------

def _resolve(name: str, row: str, scale: str, seed: int = 0):
    from paper_repro.experiment import load_experiment
    from paper_repro.training.methods import resolve_row
    exp = load_experiment(name)
    return resolve_row(exp, row, scale, seed=seed)


@pytest.mark.parametrize("scale", ["paper", "cpu", "smoke"])
def test_modern_reuses_table1_runs_and_pretraining(scale):
    """PGD AT and AFT are Table 1's runs (same hash and folder); AFT-* share its pre-training."""
    from paper_repro.experiment import load_experiment
    from paper_repro.training.pipeline import pretrain_config
    exp = load_experiment("modern")
    for row, source in (("pgd_at", "pgd_at"), ("pgd_at_es", "pgd_at"), ("aft", "aft")):
        mine, theirs = _resolve("modern", row, scale, 1), _resolve("table1", source, scale, 1)
        assert mine.config_hash() == theirs.config_hash() and mine.run_path == theirs.run_path
        assert exp.source(row) == ("table1", source)
    assert (exp.row_select("pgd_at"), exp.row_select("pgd_at_es")) == ("final", "best")
    table1_pre = pretrain_config(_resolve("table1", "aft", scale)).config_hash()
    for row, args in (("aft_trades", {"loss": "trades"}), ("aft_mart", {"loss": "mart"}),
                      ("aft_awp", {"awp": True})):
        cfg = _resolve("modern", row, scale)
        assert cfg.method_args == args and pretrain_config(cfg).config_hash() == table1_pre
    for row in ("trades", "mart", "at_awp", "trades_awp"):
        cfg = _resolve("modern", row, scale)
        assert cfg.method == row and cfg.run_path == f"{scale}/modern/{row}/seed0"
        assert exp.source(f"{row}_es") == ("modern", row) and exp.row_select(f"{row}_es") == "best"


def test_a_view_of_another_experiments_row_must_exist(tmp_path):
    from paper_repro.experiment import load_experiment
    for view, message in (('"table1/nothing"', "view_of must name another row"),
                          ('"nowhere/pgd_at"', "view_of must name another row"),
                          ('"table1/pgd_at_es"', "not itself a view")):
        path = tmp_path / "x.toml"
        path.write_text(f'[[rows]]\nid = "a"\nview_of = {view}\n')
        with pytest.raises(ConfigError, match=message):
            load_experiment(str(path))


def test_modern_paper_numbers_are_cited():
    import pandas as pd
    from paper_repro.report.tables import REPO_PAPER_DIR
    paper = pd.read_csv(REPO_PAPER_DIR / "modern.csv")
    numbers = paper[["clean", "pgd", "aa"]].notna().any(axis=1)
    assert paper.loc[numbers, "source"].notna().all()
    trades = paper.set_index("row").loc["trades"]
    assert (trades["clean"], trades["pgd"], trades["aa"]) == (84.92, 56.61, 53.08)
