"""`python -m paper_repro plan EXPERIMENT --scale paper --gpu h100`: what a sweep will cost
before it runs.

For every run of the sweep's graph (pipeline.plan: each row × seed, and once per config hash
every run it needs first, AFT's natural pre-training and self-training's teacher included):
- optimiser steps: minibatches per epoch × the method's steps per minibatch (Free AT's
  replays) × epochs, capped by max_steps;
- training FLOPs: one training minibatch of the method on its real architecture, counted with
  the suite's FLOP counter (flops.TotalFlopCounter, as the runner counts epoch 1) on a batch of
  `PROBE_BATCH` synthetic images, scaled to the run's images per epoch × epochs. Every op the
  counter counts (convolutions, matmuls) is linear in the batch, so the scaling is exact: a
  test checks it against the FLOPs a real run records. YOPO's and Free AT's extra passes are in
  the counted minibatch. Per-epoch extras outside the minibatch loop (Fast AT's optional guard,
  off in every row) are not counted;
- monitoring FLOPs: each epoch's clean accuracy on the test set and PGD-`monitor_steps` on the
  fixed test and train subsets, and clean and PGD-10 on the `val_n` validation images;
- evaluation FLOPs: clean accuracy, PGD-`eval_steps` on `eval_n` images, and the checks (FGSM,
  PGD-100, PGD-20 at 4ε) when on; AutoAttack's budget as an upper bound: APGD-CE 100 + APGD-T
  9 × 100 + FAB-T 9 × 100 iterations (each costed as a PGD step) and Square's 5,000 queries
  (forward passes), as if every image survived to Square (each attack runs only on the images
  still robust, so the real cost is lower);
- GPU-hours = FLOPs ÷ (the GPU's dense bf16 datasheet peak × MFU), the peak from gpus.py (the
  table bench measures MFU against; `--gpu h100-pcie` for a PCIe card). MFU is the one `bench`
  measured for that (method, architecture) on that GPU where results/bench holds it, else the
  stated default per architecture below. With --gpus-per-job N, a job's wall time is its
  GPU-hours ÷ N (data parallel, assuming linear scaling).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import torch

from ..store import layout
from .harness import make_bench
from ..config import RunConfig
from ..data import dataset_info
from ..data.registry import EXTRA_DATA
from ..errors import ConfigError
from ..robustness.evaluation import VAL_STEPS, pgd_attack
from ..training.flops import TotalFlopCounter
from .gpus import get_gpu, gpu_of
from ..training.methods import get_method
from ..models import build_model
from ..training.pipeline import plan as run_graph

PROBE_BATCH = 2  # images per counted minibatch (BatchNorm needs more than one)
# MFU where bench has not measured the GPU (performance.md §5.1 anchors: tuned small convnets
# 25-36% on A100, standard ResNet-18 training ~25%, ResNet-50 on ImageNet ~17-19%)
DEFAULT_MFU = {"wrn": 0.25, "preact-resnet18": 0.25, "resnet50": 0.17}
FALLBACK_MFU = 0.15
AA_ITERATIONS = 100 + 9 * 100 + 9 * 100  # APGD-CE, APGD-T (9 targets), FAB-T (9 targets)
AA_SQUARE_QUERIES = 5_000


@dataclass
class RunCost:
    run_path: str
    method: str
    arch: str
    steps: int
    train_flops: int
    monitor_flops: int
    eval_flops: int
    aa_flops: int  # an upper bound
    mfu: float
    mfu_source: str
    gpu_hours: float = 0.0

    @property
    def total_flops(self) -> int:
        return self.train_flops + self.monitor_flops + self.eval_flops + self.aa_flops


def train_images(cfg: RunConfig) -> int:
    """The run's training images per epoch, as the runner's data/splits.py builds them."""
    n = dataset_info(cfg.dataset).train_size if cfg.train_subset is None else cfg.train_subset
    if cfg.train_subset is None:  # the validation images leave the full training set
        n -= cfg.val_n
    if cfg.extra_data == "pseudo-label":
        n += cfg.extra_data_n
    elif cfg.extra_data == "ti500k":
        n += EXTRA_DATA["ti500k"].train_size
    return n


def _count(fn) -> int:
    with TotalFlopCounter() as counter:
        fn()
    return int(counter.get_total_flops())


def _per_image(flops: int) -> Fraction:
    return Fraction(flops, PROBE_BATCH)


def training_flops_per_image(cfg: RunConfig) -> Fraction:
    """FLOPs of one training minibatch of the real method and architecture, per image."""
    probe = dataclasses.replace(cfg, batch_size=PROBE_BATCH, device="cpu", precision="fp32",
                                channels_last=False, compile=False, max_steps=None,
                                drop_last=True)
    bench = make_bench(probe, steps=1)
    return _per_image(_count(lambda: bench.run(bench.method.train_epoch, max_batches=1)))


def attack_flops_per_image(cfg: RunConfig) -> dict[str, Fraction]:
    """Forward, and PGD-k as a + b·k (k steps, then the classifying forward), per image."""
    info = dataset_info(cfg.dataset)
    model = build_model(cfg, info).eval()
    x = torch.rand(PROBE_BATCH, info.channels, info.size, info.size)
    y = torch.zeros(PROBE_BATCH, dtype=torch.int64)

    def pgd(k: int) -> int:
        attack = pgd_attack(model, eps=cfg.eps, alpha=cfg.eval_alpha_value, steps=k)
        return _count(lambda: model(attack(x, y)))

    one, two = pgd(1), pgd(2)
    return {"forward": _per_image(_count(lambda: model(x))),
            "pgd_base": _per_image(2 * one - two), "pgd_step": _per_image(two - one)}


def _pgd(cost: dict[str, Fraction], steps: int) -> Fraction:
    return cost["pgd_base"] + steps * cost["pgd_step"] if steps > 0 else cost["forward"]


def cost_of(cfg: RunConfig, run_path: str, gpu: str, mfu: float | None,
            measured: dict[tuple[str, str], float]) -> RunCost:
    """One run's steps and FLOPs (GPU-hours are filled in by `plan_costs`)."""
    n = train_images(cfg)
    batches = n // cfg.batch_size if cfg.drop_last and n >= cfg.batch_size \
        else -(-n // cfg.batch_size)
    epoch_images = batches * cfg.batch_size if cfg.drop_last and n >= cfg.batch_size else n
    steps = get_method(cfg.method)(cfg).optimizer_steps_per_epoch(batches) * cfg.epochs
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    attack = attack_flops_per_image(cfg)
    info = dataset_info(cfg.dataset)
    # a streamed dataset (ImageNet) is evaluated on a fixed subset of eval_n of its test images
    test_n = info.test_size if info.in_memory else min(cfg.eval_n or info.test_size,
                                                        info.test_size)
    eval_n = test_n if cfg.eval_n is None else min(cfg.eval_n, test_n)
    monitor = attack["forward"] * test_n
    if cfg.monitor_n > 0 and cfg.monitor_steps > 0:
        monitor += 2 * min(cfg.monitor_n, test_n) * _pgd(attack, cfg.monitor_steps)
    if cfg.val_n > 0:  # every epoch: clean and PGD-10 on the validation images (best.pt)
        monitor += cfg.val_n * (attack["forward"] + _pgd(attack, VAL_STEPS))
    evaluation = attack["forward"] * test_n + eval_n * _pgd(attack, cfg.eval_steps)
    if cfg.eval_checks:
        evaluation += eval_n * (_pgd(attack, 1) + _pgd(attack, 100) + _pgd(attack, 20))
    aa_n = 0 if cfg.aa_n == 0 else (eval_n if cfg.aa_n is None else min(cfg.aa_n, eval_n))
    aa = aa_n * (AA_ITERATIONS * attack["pgd_step"] + AA_SQUARE_QUERIES * attack["forward"])
    chosen, source = _mfu(cfg, gpu, mfu, measured)
    return RunCost(run_path, cfg.method, cfg.arch, steps,
                   int(training_flops_per_image(cfg) * epoch_images * cfg.epochs),
                   int(monitor * cfg.epochs), int(evaluation), int(aa), chosen, source)


def _mfu(cfg: RunConfig, gpu: str, mfu: float | None,
         measured: dict[tuple[str, str], float]) -> tuple[float, str]:
    if mfu is not None:
        return mfu, "--mfu"
    if (cfg.method, cfg.arch) in measured:
        return measured[(cfg.method, cfg.arch)], f"bench on {gpu}"
    for prefix, value in DEFAULT_MFU.items():
        if cfg.arch.split(":")[-1].startswith(prefix):
            return value, "default"
    return FALLBACK_MFU, "default"


def measured_mfu(gpu: str, bench_dir: Path) -> dict[tuple[str, str], float]:
    """(method, arch) -> the best datasheet MFU `bench` measured on that kind of GPU."""
    out: dict[tuple[str, str], float] = {}
    for path in sorted(bench_dir.glob("*.json")):
        data = layout.read_json(path) or {}
        for entry in data.get("entries", []) if isinstance(data, dict) else []:
            measured_on = gpu_of(str(entry.get("device", "")))
            if measured_on is not None and measured_on.name == gpu and \
                    entry.get("mfu_datasheet"):
                key = (entry["method"], entry["arch"])
                out[key] = max(out.get(key, 0.0), float(entry["mfu_datasheet"]))
    return out


def plan_costs(configs: Sequence[RunConfig], gpu: str, *, mfu: float | None = None,
               bench_dir: Path = Path("results/bench")) -> list[RunCost]:
    """The cost of every run of the configs' graph, prerequisites first (each once)."""
    peak = get_gpu(gpu).peak_tflops  # an unknown name: one line listing the known ones
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"plan: --mfu must be in (0, 1], got {mfu}")
    measured = measured_mfu(gpu, bench_dir)
    costs = []
    for run in run_graph(configs).values():
        cost = cost_of(run.cfg, run.run_path, gpu, mfu, measured)
        cost.gpu_hours = cost.total_flops / (peak * 1e12 * cost.mfu) / 3600
        costs.append(cost)
    return costs


def render(costs: Sequence[RunCost], gpu: str, gpus_per_job: int = 1) -> str:
    """The plan as a Markdown table, one line per run, then the total."""
    from tabulate import tabulate

    pf = 1e15
    rows = [[c.run_path, c.method, c.arch, c.steps, c.train_flops / pf, c.monitor_flops / pf,
             c.eval_flops / pf, c.aa_flops / pf, f"{c.mfu:.2f} ({c.mfu_source})",
             c.gpu_hours, c.gpu_hours / gpus_per_job] for c in costs]
    total = [sum(c.total_flops for c in costs), sum(c.gpu_hours for c in costs)]
    rows.append(["total", "", "", sum(c.steps for c in costs),
                 sum(c.train_flops for c in costs) / pf, sum(c.monitor_flops for c in costs) / pf,
                 sum(c.eval_flops for c in costs) / pf, sum(c.aa_flops for c in costs) / pf, "",
                 total[1], ""])
    headers = ["run", "method", "arch", "steps", "train PFLOP", "monitor PFLOP", "eval PFLOP",
               "AA PFLOP (≤)", "MFU", f"GPU-h ({gpu})", f"job wall-h ({gpus_per_job} GPU)"]
    without_aa = sum(c.gpu_hours * (1 - c.aa_flops / c.total_flops) for c in costs
                     if c.total_flops)
    return (tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3g") + "\n\n"
            f"{len(costs)} runs, {total[0] / pf:.4g} PFLOP, {total[1]:.4g} GPU-hours on "
            f"{gpu} at {get_gpu(gpu).peak_tflops:g} TFLOP/s × MFU, AutoAttack as an upper bound "
            f"({without_aa:.4g} GPU-hours without AutoAttack).")


# --- before a local sweep ---------------------------------------------------------------------


def this_gpu() -> str | None:
    """The plan's name of this machine's GPU (h100, a100...), or None (none, or not known)."""
    if not torch.cuda.is_available():
        return None
    gpu = gpu_of(torch.cuda.get_device_name())
    return None if gpu is None else gpu.name


def local_estimate(configs: Sequence[RunConfig], slots, *,
                   committed: Path = Path("results")) -> str:
    """One line before a local sweep: the runs it will train and, where their cost is known,
    the expected wall time with the pool's slots (`slots`: pool.Slots). At paper scale on a
    known GPU the cost is the plan's (GPU-hours at the datasheet peak × MFU); otherwise it is
    the time the same runs took in the committed store, where it has them (one thread each)."""
    graph = run_graph(configs)
    todo = {d: r for d, r in graph.items() if not layout.is_done(d)}
    if not todo:
        return ""
    gpu = this_gpu()
    seconds: dict[Path, float] = {}
    if gpu and any(r.cfg.scale == "paper" for r in todo.values()):
        by_path = {c.run_path: c for c in plan_costs(configs, gpu)}
        seconds = {d: by_path[r.run_path].gpu_hours * 3600 / slots.gpus_per_run
                   for d, r in todo.items() if r.run_path in by_path}
        source = f"plan on {gpu}: {sum(c.gpu_hours for c in by_path.values()):.3g} GPU-hours"
    else:
        for d, r in todo.items():
            record = layout.read_record(layout.run_dir(committed, r.run_path)) or {}
            parts = [record.get(k) for k in ("train_time_s", "eval_time_s", "aa_time_s")]
            if record.get("status") == layout.STATUS_DONE and parts[0] is not None:
                seconds[d] = sum(p or 0.0 for p in parts)
        source = f"from the times of the same runs in {committed}/"
    line = (f"plan: {len(todo)} run(s) to train ({len(graph) - len(todo)} done), "
            f"{slots.describe()}")
    if not seconds:
        return line
    wall = _list_schedule(todo, seconds, slots.jobs)
    unknown = len(todo) - len(seconds)
    return (f"{line}; expected wall time ~{wall / 60:.0f} min ({source}"
            + (f"; {unknown} run(s) without an estimate" if unknown else "") + ")")


def _list_schedule(todo: dict, seconds: dict[Path, float], slots: int) -> float:
    """The wall time of the pool's order (pool.py): whenever a slot is free, the first ready run
    of its priority order starts (unknown runs count as zero)."""
    from ..orchestration.pool import critical_first

    waiting, finish, now = critical_first(todo), {}, 0.0
    while waiting:
        busy = sum(end > now for end in finish.values())
        ready = [r for r in waiting
                 if all(n not in todo or finish.get(n, math.inf) <= now for n in r.needs)]
        if ready and busy < slots:
            finish[ready[0].directory] = now + seconds.get(ready[0].directory, 0.0)
            waiting.remove(ready[0])
        else:
            now = min(end for end in finish.values() if end > now)
    return max(finish.values(), default=0.0)
