"""One evaluation protocol for every row (DESIGN §7).

Clean accuracy on the full test set; PGD-k (k = 20 for the tables) at the table's ε with
α = ε/4, one random start, the model in eval mode, fp32, on a fixed subset of the test set
(the same images for every run; all of them at paper scale). Per-epoch monitoring uses the
same attack on fixed subsets of the test and the (un-augmented) training set.

Because PGD-20 alone can overstate robustness, the final evaluation adds
- AutoAttack, the standard version (Croce & Hein 2020, as on RobustBench): APGD-CE, APGD-T
  (9 target classes), FAB-T (9 target classes), 100 iterations each, then Square (5,000
  queries), each later attack on the points still robust. It runs through `pyautoattack`, the
  PyPI packaging of the authors' code (the original `autoattack` is not on PyPI;
  torchattacks' AutoAttack uses 10 iterations and is optimistic). It runs on
  `fixed_subset(N, aa_n)`: the first aa_n of the fixed permutation whose first eval_n are the PGD
  images, so its images are among PGD's but are not the first aa_n of the (sorted) PGD images;
  a user gets them with `load_test_images(run, subset="aa")`.
- sanity checks against gradient masking (Athalye et al. 2018, Carlini et al. 2019), computed
  on the PGD images and stored in the record (`checks`: "ok" or the failed checks' names):
    order_clean_fgsm  FGSM accuracy above clean accuracy
    order_fgsm_pgd    PGD-20 above FGSM: the one-step attack beats the iterative one
    order_pgd_aa      AutoAttack above PGD-20 on the AutoAttack images
    pgd100            PGD-100 more than PGD100_MARGIN_PP below PGD-20: PGD-20 had not converged
    large_eps         accuracy under PGD-20 at LARGE_EPS_FACTOR × ε above LARGE_EPS_MAX_ACC
    aa_flags          AutoAttack's own detectors warned (randomised or softmax output, dynamic
                      defence, Square beating the white-box attacks, too few classes)
  "above" allows ORDER_TOLERANCE_PP of slack for the random start's noise.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..store import files, layout
from .attacks import frozen_parameters, pgd
from ..models.weights import load_weights
from ..store.checkpoints import BEST_FILE, read_best
from ..config import EVALUATION_FIELDS, RunConfig
from ..data import dataset_info
from ..data.splits import fixed_subset, load_test_set  # the same fixed images for every run
from ..runtime.environment import resolve_device
from ..errors import CheckpointError
from ..models import build_model
from ..runtime.provenance import code_version, hardware

# AutoAttack
AA_PACKAGE = "pyautoattack"
AA_VERSION = "standard"
AA_ATTACKS = "apgd-ce, apgd-t (9 targets), fab-t (9 targets), 100 iterations; square (5000 queries)"
# Sanity checks: thresholds in percentage points of accuracy
ORDER_TOLERANCE_PP = 0.5   # a stronger attack may leave at most this much more accuracy
PGD100_MARGIN_PP = 1.0     # PGD-100 may be at most this far below PGD-20
LARGE_EPS_FACTOR = 4.0     # the "large" radius: 4 × ε (capped at 1)
LARGE_EPS_MAX_ACC = 5.0    # "near zero" accuracy at the large radius
CHECK_NAMES = ("order_clean_fgsm", "order_fgsm_pgd", "order_pgd_aa", "pgd100", "large_eps",
               "aa_flags")
# Early stopping (validation split): the per-epoch score is PGD-VAL_STEPS on the validation
# images (monitoring.py); the best epoch's model is measured with the protocol above, and its
# numbers are the record's `best_<key>` for each of these keys
VAL_STEPS = 10
BEST_KEYS = ("clean_acc", "pgd_acc", "aa_acc", "aa_clean_acc", "aa_pgd_acc", "aa_warnings",
             "fgsm_acc", "pgd100_acc", "large_eps_acc", "checks")

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(images in [0,1], labels) -> adversarial images."""


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device):
    for start in range(0, len(labels), batch):
        x = images[start:start + batch].to(device, non_blocking=True).float().div_(255)
        yield x, labels[start:start + batch].to(device, non_blocking=True)


def correct_flags(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  attack: Attack | None, *, batch: int, device: torch.device) -> torch.Tensor:
    """Per image: is it classified correctly (after `attack`, if given)? Eval mode."""
    model.eval()
    flags = []
    for x, y in _batches(images, labels, batch, device):
        x_adv = attack(x, y) if attack is not None else x
        with torch.no_grad():
            flags.append((model(x_adv).argmax(1) == y).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def _pct(flags: torch.Tensor) -> float:
    return 100.0 * flags.sum().item() / max(len(flags), 1)


@torch.no_grad()
def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   batch: int, device: torch.device) -> float:
    return _pct(correct_flags(model, images, labels, None, batch=batch, device=device))


def pgd_attack(model: nn.Module, *, eps: float, alpha: float, steps: int,
               random_start: bool = True) -> Attack:
    return lambda x, y: pgd(model, x, y, eps=eps, alpha=alpha, steps=steps,
                            random_start=random_start)


def pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                 alpha: float, steps: int, batch: int, device: torch.device) -> float:
    """Accuracy under L∞ PGD-`steps` with one random start, eval mode."""
    attack = pgd_attack(model, eps=eps, alpha=alpha, steps=steps) if steps > 0 else None
    return _pct(correct_flags(model, images, labels, attack, batch=batch, device=device))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def autoattack_flags(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     eps: float, batch: int, device: torch.device,
                     seed: int) -> tuple[torch.Tensor, list[str]]:
    """Per image: still correct after standard AutoAttack (L∞)? And AutoAttack's warnings."""
    from pyautoattack import AutoAttack, checks

    model.eval()
    x = images.to(device).float().div_(255)
    y = labels.to(device)
    aa = AutoAttack(model, eps=eps, norm="Linf", version=AA_VERSION, seed=seed, device=device)
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])  # targets: at most the other classes
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_classes - 1)
    checks.funcs.update(dict.fromkeys(checks.funcs, 0))  # its dynamic-defence counter is global
    collect = _Collect()
    aa.logger.addHandler(collect)
    try:
        with frozen_parameters(model):  # no parameter .grad is written by the attacks
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch)
    finally:
        aa.logger.removeHandler(collect)
    return (y_adv == y).cpu(), collect.messages


def masking_flags(warnings: list[str]) -> list[str]:
    """AutoAttack warnings that flag the evaluation. Points with an exactly zero gradient are
    recorded but not flagged: a very confident honest model underflows its cross-entropy
    gradient in fp32; masking that matters shows in `large_eps` and in Square's warning."""
    return [w for w in warnings if "zero gradient" not in w]


def sanity_checks(acc: dict[str, float], aa_warnings: list[str] | None = None) -> list[str]:
    """Names of the failed checks (see the module docstring) from accuracies in %.

    `acc` holds clean, fgsm, pgd20, pgd100, large_eps on the same images, and, when
    AutoAttack ran, aa and pgd20_on_aa on the AutoAttack images.
    """
    failed = []
    if acc["fgsm"] > acc["clean"] + ORDER_TOLERANCE_PP:
        failed.append("order_clean_fgsm")
    if acc["pgd20"] > acc["fgsm"] + ORDER_TOLERANCE_PP:
        failed.append("order_fgsm_pgd")
    if "aa" in acc and acc["aa"] > acc["pgd20_on_aa"] + ORDER_TOLERANCE_PP:
        failed.append("order_pgd_aa")
    if acc["pgd100"] < acc["pgd20"] - PGD100_MARGIN_PP:
        failed.append("pgd100")
    if acc["large_eps"] > LARGE_EPS_MAX_ACC:
        failed.append("large_eps")
    if masking_flags(aa_warnings or []):
        failed.append("aa_flags")
    return failed


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
             alpha: float, steps: int, n: int | None, batch: int, device: torch.device,
             seed: int = 0, aa_n: int | None = 0, checks: bool = False) -> dict:
    """The table protocol: clean on all images, PGD on the fixed subset of n images; with
    `aa_n` (None: all n images, 0: off) AutoAttack on fixed_subset(N, aa_n), a subset of them;
    with `checks` the sanity checks. Returns the record's evaluation fields."""
    torch.manual_seed(seed)  # the random start is part of the protocol: make it repeatable
    idx = fixed_subset(len(labels), n)
    clean = correct_flags(model, images, labels, None, batch=batch, device=device)
    sub_x, sub_y = images[idx], labels[idx]
    pgd20 = correct_flags(model, sub_x, sub_y, pgd_attack(model, eps=eps, alpha=alpha,
                                                          steps=steps) if steps > 0 else None,
                          batch=batch, device=device)
    out: dict = {"clean_acc": _pct(clean), "pgd_acc": _pct(pgd20), "eval_n": int(len(idx)),
                 "eval_steps": steps}
    acc = {"clean": _pct(clean[idx]), "pgd20": _pct(pgd20)}
    aa_warnings = None
    if aa_n != 0:
        t0 = time.perf_counter()
        aa_idx = fixed_subset(len(labels), min(aa_n or len(idx), len(idx)))
        on_aa = torch.isin(idx, aa_idx)
        on_device = on_aa.to(sub_x.device)
        aa, aa_warnings = autoattack_flags(model, sub_x[on_device], sub_y[on_device], eps=eps,
                                           batch=batch, device=device, seed=seed)
        acc.update(aa=_pct(aa), pgd20_on_aa=_pct(pgd20[on_aa]))
        out.update(aa_acc=acc["aa"], aa_n=int(on_aa.sum()), aa_version=AA_VERSION,
                   aa_package=_package_version(AA_PACKAGE), aa_attacks=AA_ATTACKS,
                   aa_clean_acc=_pct(clean[idx][on_aa]), aa_pgd_acc=acc["pgd20_on_aa"],
                   aa_warnings=aa_warnings, aa_time_s=round(time.perf_counter() - t0, 3))
    if checks:
        large = min(LARGE_EPS_FACTOR * eps, 1.0)
        attacks = {"fgsm": pgd_attack(model, eps=eps, alpha=eps, steps=1, random_start=False),
                   "pgd100": pgd_attack(model, eps=eps, alpha=alpha, steps=100),
                   "large_eps": pgd_attack(model, eps=large, alpha=large / 4, steps=20)}
        for k, (name, attack) in enumerate(attacks.items(), start=1):
            torch.manual_seed(seed + k)
            acc[name] = _pct(correct_flags(model, sub_x, sub_y, attack, batch=batch,
                                           device=device))
        failed = sanity_checks(acc, aa_warnings)
        out.update(fgsm_acc=acc["fgsm"], pgd100_acc=acc["pgd100"],
                   large_eps_acc=acc["large_eps"], large_eps=large,
                   checks=",".join(failed) or "ok", check_thresholds=thresholds())
    return out


def thresholds() -> dict[str, float]:
    """The checks' thresholds, stored with every record that was checked."""
    return {"order_tolerance_pp": ORDER_TOLERANCE_PP, "pgd100_margin_pp": PGD100_MARGIN_PP,
            "large_eps_factor": LARGE_EPS_FACTOR, "large_eps_max_acc": LARGE_EPS_MAX_ACC}


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return name


# --- a run's final evaluation, and the same again for a done run -----------------------------

def final_evaluation(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor,
                     cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The table protocol with the run's evaluation settings."""
    return evaluate(model, test_x, test_y, eps=cfg.eps, alpha=cfg.eval_alpha_value,
                    steps=cfg.eval_steps, n=cfg.eval_n, batch=cfg.eval_batch, device=device,
                    seed=cfg.seed, aa_n=cfg.aa_n, checks=cfg.eval_checks)


def best_evaluation(model: nn.Module, directory: Path, final: dict[str, Any], epochs_done: int,
                    test_x: torch.Tensor, test_y: torch.Tensor, cfg: RunConfig,
                    device: torch.device) -> dict[str, Any]:
    """The same protocol on the run's best epoch (best.pt), as the record's best_* keys ({}
    when the run kept no best.pt). `final` is the final model's evaluation: when the last epoch
    is the best one, its weights are the same and so are its numbers. Otherwise best.pt's
    weights are loaded into `model` (the final weights must be measured by then)."""
    path = directory / BEST_FILE
    best = read_best(path)
    if best is None and path.is_file():
        raise CheckpointError(f"{path}: torn or not a best.pt of this suite; remove it to record "
                              "the final model only, or train the run again")
    if best is None:
        return {}
    measured = final
    if best["epoch"] != epochs_done:
        model.load_state_dict(best["model"])
        measured = final_evaluation(model, test_x, test_y, cfg, device)
    return {"val_n": cfg.val_n, "val_steps": VAL_STEPS, "best_epoch": best["epoch"],
            "best_val_pgd_acc": best["val_pgd_acc"],
            "best_val_clean_acc": best.get("val_clean_acc"),
            **{f"best_{k}": measured[k] for k in BEST_KEYS if k in measured}}


def missing_evaluation(cfg: RunConfig, record: dict[str, Any]) -> bool:
    """Does the config ask a done run for an evaluation its record lacks (checks, AutoAttack,
    or AutoAttack on another number of images), for its final model or its best epoch's?"""
    prefixes = ("", "best_") if record.get("best_epoch") is not None else ("",)
    for prefix in prefixes:
        if cfg.eval_checks and f"{prefix}checks" not in record:
            return True
    if cfg.aa_n == 0:
        return False
    eval_n = int(record.get("eval_n") or 0)
    wanted = eval_n if cfg.aa_n is None else min(cfg.aa_n, eval_n)
    return (any(record.get(f"{prefix}aa_acc") is None for prefix in prefixes)
            or record.get("aa_n") != wanted or record.get("aa_version") != AA_VERSION)


def reevaluate(cfg: RunConfig, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a done run again from its checkpoint.pt (and best.pt, where it kept its best
    epoch), training nothing, and update its record (atomically). Only record.json and
    config.json's evaluation fields change; clean and PGD numbers that come out different (a
    non-deterministic device) keep their old values in `previous_eval`."""
    needed = ["checkpoint.pt"] + ([BEST_FILE] if record.get("best_epoch") is not None else [])
    for name in needed:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is done but its record lacks the evaluation "
                                  f"asked for (AutoAttack on aa_n images, checks) and it has no "
                                  f"{name} to evaluate: copy it back, or set aa_n=0 and "
                                  "eval_checks=false to take the record as it is")
    device = resolve_device(cfg.device)
    test_x, test_y = load_test_set(cfg)
    model = build_model(cfg, dataset_info(cfg.dataset))
    load_weights(model, directory / "checkpoint.pt")
    model.to(device)
    t_eval = time.perf_counter()
    test_x, test_y = test_x.to(device), test_y.to(device)
    final = final_evaluation(model, test_x, test_y, cfg, device)
    if record.get("best_epoch") is not None:
        final.update(best_evaluation(model, directory, final, record["epochs_done"], test_x,
                                     test_y, cfg, device))
    previous = {k: record[k] for k in ("clean_acc", "pgd_acc", "best_clean_acc", "best_pgd_acc")
                if k in record and record.get(k) != final.get(k)}
    updated = {**record, **final, "eval_time_s": round(time.perf_counter() - t_eval, 3),
               "reevaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "reevaluated_code": code_version(), "reevaluated_hardware": hardware()}
    if previous:
        updated["previous_eval"] = previous
    config = layout.read_json(directory / "config.json") or {}
    files.atomic_write_json(directory / "config.json",
                              {**config, **{k: getattr(cfg, k) for k in EVALUATION_FIELDS}})
    return layout.write_record(directory, updated)
