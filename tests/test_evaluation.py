"""evaluation.py: AutoAttack, the gradient-masking checks, a library cross-check, re-evaluation."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn as nn

from paper_repro import results
from paper_repro.training import runner
from paper_repro.errors import CheckpointError
from paper_repro.robustness.evaluation import (LARGE_EPS_MAX_ACC, PGD100_MARGIN_PP, evaluate, fixed_subset,
                                    pgd_attack, correct_flags, sanity_checks)
from conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_model():
    """A width-4 cnn-small trained naturally for a second: AutoAttack's cost is its iteration
    counts (6,900 model calls for a point that survives), so its tests use a cheap model."""
    from paper_repro.data import dataset_info, load_arrays
    from paper_repro.models import create_model

    torch.manual_seed(0)
    x, y = load_arrays("fashion-mnist", None, train=True)
    x, y = x[:2048].float() / 255, y[:2048]
    info = dataset_info("fashion-mnist")
    model = create_model("cnn-small", num_classes=10, in_channels=1, mean=info.mean,
                         std=info.std, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _epoch in range(3):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def test_pyautoattack_standard_is_the_robustbench_configuration():
    """The package keeps the authors' standard version: APGD-CE, APGD-T (9 targets), FAB-T
    (9 targets), 100 iterations each, Square with 5,000 queries, one restart each."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(nn.Linear(2, 10), eps=0.1, version="standard", device="cpu")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa.apgd.n_iter == aa.apgd_targeted.n_iter == aa.fab.n_iter == 100
    assert aa.apgd.n_restarts == aa.apgd_targeted.n_restarts == aa.fab.n_restarts == 1
    assert aa.apgd_targeted.n_target_classes == aa.fab.n_target_classes == 9
    assert aa.square.n_queries == 5000


def test_autoattack_is_no_weaker_than_pgd_and_an_honest_model_passes_the_checks(
        small_model, fashion_test):
    x, y = fashion_test
    before = [p.detach().clone() for p in small_model.parameters()]
    out = evaluate(small_model, x, y, eps=0.04, alpha=0.01, steps=20, n=12, batch=12,
                   device=CPU, aa_n=12, checks=True)
    assert out["aa_n"] == 12 and out["aa_version"] == "standard"
    assert "pyautoattack" in out["aa_package"]
    assert 0 < out["aa_acc"] <= out["pgd_acc"] < out["clean_acc"], out  # a non-trivial case
    assert out["checks"] == "ok", out
    assert out["clean_acc"] >= out["fgsm_acc"] >= out["pgd_acc"]
    assert out["large_eps_acc"] <= LARGE_EPS_MAX_ACC
    assert all(p.grad is None for p in small_model.parameters())  # no weight gradients
    assert all(p.requires_grad for p in small_model.parameters())  # unfrozen again
    assert all(torch.equal(a, b) for a, b in zip(before, small_model.parameters()))


def test_autoattack_runs_on_the_first_images_of_the_pgd_subset(small_model, fashion_test):
    x, y = fashion_test
    out = evaluate(small_model, x, y, eps=0.3, alpha=0.075, steps=5, n=40, batch=40,
                   device=CPU, aa_n=16, checks=False)  # at ε = 0.3 APGD-CE leaves no point
    assert out["aa_n"] == 16 and out["eval_n"] == 40 and "checks" not in out
    assert bool(torch.isin(fixed_subset(len(y), 16), fixed_subset(len(y), 40)).all())
    off = evaluate(small_model, x, y, eps=0.3, alpha=0.075, steps=5, n=40, batch=40,
                   device=CPU, aa_n=0)
    assert "aa_acc" not in off and off["pgd_acc"] == out["pgd_acc"]  # PGD unchanged by AA


class Quantised(nn.Module):
    """Gradient masking by construction: the input is rounded to 4 grey levels, so the
    gradient is zero everywhere and gradient attacks cannot move."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 3) / 3)


def test_a_gradient_masking_model_is_flagged(small_model, fashion_test):
    x, y = fashion_test
    masked = Quantised(small_model).eval()
    out = evaluate(masked, x, y, eps=0.1, alpha=0.025, steps=20, n=12, batch=12, device=CPU,
                   aa_n=12, checks=True)
    failed = out["checks"].split(",")
    assert "large_eps" in failed       # PGD at 4ε cannot move the input: accuracy stays high
    assert "aa_flags" in failed        # Square (black-box) beats the white-box attacks
    assert out["aa_acc"] < out["pgd_acc"] - 10   # PGD-20 alone would overstate robustness


def test_each_check_fails_on_its_own_broken_case():
    honest = dict(clean=80.0, fgsm=55.0, pgd20=50.0, pgd100=49.5, large_eps=0.0, aa=47.0,
                  pgd20_on_aa=50.0)
    assert sanity_checks(honest) == []
    broken = {
        "order_clean_fgsm": dict(fgsm=85.0),
        "order_fgsm_pgd": dict(fgsm=45.0),                    # one step beats twenty
        "order_pgd_aa": dict(aa=53.0),
        "pgd100": dict(pgd100=50.0 - PGD100_MARGIN_PP - 0.1),
        "large_eps": dict(large_eps=LARGE_EPS_MAX_ACC + 1),
    }
    for name, change in broken.items():
        assert sanity_checks({**honest, **change}) == [name], name
    assert sanity_checks(honest, ["Square Attack has decreased the robust accuracy"]) == \
        ["aa_flags"]
    # an exactly zero gradient on a very confident point is recorded, not flagged
    assert sanity_checks(honest, ["there are 2 points with zero gradient!"]) == []
    assert "order_pgd_aa" not in sanity_checks({k: v for k, v in honest.items()
                                                if k not in ("aa", "pgd20_on_aa")})


@pytest.mark.parametrize("eps", [0.02, 0.04])
def test_our_pgd_matches_torchattacks_pgd(trained_model, fashion_test, eps):
    """Independent cross-check: the same ε, α, steps and no random start give the same robust
    accuracy as torchattacks' PGD (within 0.5 pp) on the same trained model."""
    import torchattacks

    x, y = fashion_test[0][:256], fashion_test[1][:256]
    alpha, steps = eps / 4, 20
    ours = correct_flags(trained_model, x, y, pgd_attack(trained_model, eps=eps, alpha=alpha,
                                                         steps=steps, random_start=False),
                         batch=256, device=CPU).float().mean().item() * 100
    library = torchattacks.PGD(trained_model, eps=eps, alpha=alpha, steps=steps,
                               random_start=False)
    theirs = correct_flags(trained_model, x, y, library, batch=256,
                           device=CPU).float().mean().item() * 100
    clean = correct_flags(trained_model, x, y, None, batch=256, device=CPU).float().mean() * 100
    assert 5 < ours < clean - 5  # a non-trivial robust accuracy, not 0 against 0
    assert abs(ours - theirs) <= 0.5, (ours, theirs)


def test_a_done_run_lacking_autoattack_is_evaluated_without_retraining(tmp_path):
    cfg = tiny_config(tmp_path, method="pgd_at", aa_n=0, eval_checks=False)
    first = runner.train_run(cfg, quiet=True)
    assert "aa_acc" not in first and "checks" not in first
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    kept = {name: ((directory / name).read_bytes(), (directory / name).stat().st_mtime_ns)
            for name in ("checkpoint.pt", "metrics.csv", "lr.csv")}

    cfg_aa = tiny_config(tmp_path, method="pgd_at", aa_n=20)
    assert cfg_aa.config_hash() == cfg.config_hash()  # evaluation settings are not identity
    record = runner.train_run(cfg_aa, quiet=True)
    assert record["aa_n"] == 20 and record["aa_acc"] <= record["aa_pgd_acc"] + 0.5
    assert record["checks"] and record["status"] == "done"
    for key in ("clean_acc", "pgd_acc", "train_time_s", "train_flops", "steps_done"):
        assert record[key] == first[key], key
    assert "previous_eval" not in record  # the same numbers came out again
    for name, (data, mtime) in kept.items():
        assert (directory / name).read_bytes() == data, name
        assert (directory / name).stat().st_mtime_ns == mtime, name
    assert results.read_record(directory) == record
    assert json.loads((directory / "config.json").read_text())["aa_n"] == 20

    mtime = (directory / "record.json").stat().st_mtime_ns
    assert runner.train_run(cfg_aa, quiet=True) == record  # nothing more to do: untouched
    assert (directory / "record.json").stat().st_mtime_ns == mtime
    assert runner.train_run(cfg, quiet=True) == record     # asking for less removes nothing


def test_reevaluation_without_a_checkpoint_says_what_to_do(tmp_path):
    cfg = tiny_config(tmp_path, aa_n=0, eval_checks=False)
    runner.train_run(cfg, quiet=True)
    directory = results.run_dir(cfg.results_dir, cfg.run_path)
    (directory / "checkpoint.pt").unlink()
    before = (directory / "record.json").read_text()
    with pytest.raises(CheckpointError, match="no checkpoint.pt") as info:
        runner.train_run(tiny_config(tmp_path, aa_n=10), quiet=True)
    assert "\n" not in str(info.value)
    assert (directory / "record.json").read_text() == before


def test_seeds_give_mean_std_and_n_with_autoattack_and_checks(tmp_path):
    """`sweep --seeds 2`: two runs of the row, the table shows mean ± std over them and N = 2."""
    from paper_repro import cli

    assert cli.main(["sweep", "table1", "--rows", "natural", "--scale", "smoke", "--seeds", "2",
                     "--aa-n", "8", "--results-dir", str(tmp_path)]) == 0
    records = [results.read_record(results.run_dir(tmp_path, f"smoke/table1/natural/seed{s}"))
               for s in (0, 1)]
    assert all(r["aa_n"] == 8 and r["checks"] for r in records)
    table = pd.read_csv(tmp_path / "tables" / "smoke" / "table1.csv").set_index("row")
    natural = table.loc["natural"]
    assert natural["n_seeds"] == 2
    assert natural["clean_acc"] == pytest.approx(sum(r["clean_acc"] for r in records) / 2)
    assert natural["aa_acc"] == pytest.approx(sum(r["aa_acc"] for r in records) / 2)
    failed = sorted({c for r in records if r["checks"] != "ok" for c in r["checks"].split(",")})
    assert natural["checks"] == (",".join(failed) or "ok") and natural["aa_n"] == 8
    assert records[0]["clean_acc"] != records[1]["clean_acc"] and natural["clean_std"] > 0
