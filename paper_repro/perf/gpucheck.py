"""`python -m paper_repro gpucheck` (`./reproduce.sh gpucheck`): one prepared check of one GPU.

A lent GPU comes with ~15 minutes of device time, so this is the one script to run on it
(<= 8 minutes, a hard wall-clock budget inside). In this order, most useful first, so that
the budget cuts the least useful pieces:
1. `bench` of every Table 1 (method, architecture) pair at batch 128 in bf16 (channels_last),
   eager, natural training of WRN-28-10 (AFT's pre-training) included, then each method only
   experiments/modern.toml trains (`bench_pairs`: from the experiment files).
2. One full PGD-10 AT epoch of WRN-28-10 (50,000 synthetic CIFAR-shaped images, 391 steps of
   128; eager bf16, the runner's default on a GPU), timed. The images are learnable (class
   patterns, below), so the epoch yields a somewhat robust model, and then
3. PGD-20 accuracy of that model on 5,000 held-out images in fp32 and under bf16 autocast,
   same random starts: they must agree within 0.5 pp (the evaluation protocol is fp32; this
   says whether bf16 would change a table's PGD column).
4. The bench pairs again, compiled (torch.compile, inductor), in the order of `bench_pairs`
   (the pairs Table 1's comparisons use first), until the budget runs out: compiling a wide
   ResNet takes a minute or more.
It writes results/bench/<gpu>.json (the bench entries, merged as `bench` merges them, and a
"gpucheck" section: what ran, was skipped, failed, with each failed piece's traceback) and
prints a table: images/s eager and compiled, s/epoch and MFU of the faster, and the hours
each Table 1 row would take at paper scale (its epochs × its per-epoch time; AFT rows add
their 200-epoch natural pre-training, AFT(+500K)'s on 550,000 images).

Budget (`--budget-s`, default 420 s after the imports; budget.py): a piece starts only if its
minimum time fits; a piece still running at the deadline is interrupted; the epoch stops
early and extrapolates. Whatever did not run is listed as skipped, and the results so far are
written all the same.

Without a GPU it prints one line and exits 0. `--device cpu --tiny` (hidden; for the tests)
runs every piece on the CPU with a width-4 cnn-small, batch 8, a few steps, and compiles only
two pairs, with aot_eager (inductor's C++ compile takes minutes on a CPU), so that the code
path is exercised in CI. This module imports nothing that needs submitit or other optional
packages.
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..store import files, layout
from . import bench
from ..runtime import fastpath
from ..data import dataset_info
from ..errors import ConfigError
from .budget import Budget, PieceLog, run_piece
from .gpus import device_name, device_slug, gpu_of
from .harness import bench_config, make_bench

# Whose (method, architecture) pairs are benched: Table 1's, then each method that only a
# later experiment trains (beyond the paper: last, so the budget cuts them first).
EXPERIMENTS = ("table1", "modern")
BATCH = 128
EPS = 8 / 255
AGREEMENT_PP = 0.5
DEFAULT_BUDGET_S = 420.0  # + imports and CUDA start-up: the whole command stays under 8 min


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big each piece is: the GPU check itself, or the CPU test's tiny stand-in."""

    arch: str | None  # None: each pair's own architecture
    model_args: dict
    batch: int
    warmup: int
    steps: int
    repeats: int
    epoch_images: int
    check_images: int
    compile_backend: str
    compiled_pairs: int | None  # how many pairs to compile (None: all; the budget may stop it)
    min_bench_s: float  # the least time a bench piece needs: do not start it with less left
    min_compiled_s: float
    min_epoch_s: float
    check_reserve_s: float  # kept back from the epoch for the PGD-20 check


GPU = Scale(arch=None, model_args={}, batch=BATCH, warmup=3, steps=10, repeats=2,
            epoch_images=dataset_info("cifar10").train_size, check_images=5_000,
            compile_backend="inductor",
            compiled_pairs=None, min_bench_s=15, min_compiled_s=60, min_epoch_s=60,
            check_reserve_s=30)
TINY = Scale(arch="cnn-small", model_args={"width": 4}, batch=8, warmup=1, steps=1, repeats=1,
             epoch_images=64, check_images=64, compile_backend="aot_eager", compiled_pairs=2,
             min_bench_s=0, min_compiled_s=0, min_epoch_s=0, check_reserve_s=0)


@dataclasses.dataclass
class Report(PieceLog):
    """What the check measured, skipped and failed; written as the JSON's "gpucheck"."""

    entries: dict[tuple[str, str, bool], dict[str, Any]] = dataclasses.field(default_factory=dict)
    epoch: dict[str, Any] | None = None
    bf16_check: dict[str, Any] | None = None


# --- learnable synthetic CIFAR-shaped data ----------------------------------------------------

def class_pattern_images(n: int, *, seed: int, num_classes: int = 10, channels: int = 3,
                         size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of `num_classes` fixed patterns: grey + a·pattern/2 + N(0, 0.06²) noise.

    Each class has a left-right symmetric ±1 pattern of 8×8-pixel blocks (flips and 2-pixel
    crops keep it). The contrast a ~ U(0, 0.5) spreads images from hopeless (a/2 below
    ε = 8/255: one in eight) to robust, so a PGD-trained model ends between 0% and 100% PGD
    accuracy: a bf16-vs-fp32 comparison at 0% or 100% would agree trivially. (Measured on the
    CPU: a 16-wide cnn-small after one PGD-10 epoch on 10,000 images, 23.7% PGD-20.)
    """
    blocks = size // 8
    g = torch.Generator().manual_seed(12345)  # the same patterns for every split
    half = torch.randint(0, 2, (num_classes, channels, blocks, (blocks + 1) // 2), generator=g)
    pattern = torch.cat([half, half.flip(3)[..., blocks % 2:]], dim=3).float() * 2 - 1
    pattern = pattern.repeat_interleave(8, 2).repeat_interleave(8, 3)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    contrast = torch.rand(n, 1, 1, 1, generator=g) * 0.5
    x = 0.5 + contrast * pattern[labels] / 2 + 0.06 * torch.randn(n, channels, size, size,
                                                                   generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


# --- the pieces -------------------------------------------------------------------------------

def _measure(report: Report, scale: Scale, device: str, method: str, arch: str,
             compiled: bool) -> None:
    entry = bench.measure(method, scale.arch or arch, scale.batch, device=device,
                          precision="bf16", compile=compiled, warmup=scale.warmup,
                          steps=scale.steps, repeats=scale.repeats,
                          model_args=scale.model_args, compile_backend=scale.compile_backend)
    entry["table1_arch"] = arch  # the pair it stands for (its own arch, except with --tiny)
    report.entries[(method, arch, compiled)] = entry
    print(bench.summary_line(entry), flush=True)
    if compiled:
        torch._dynamo.reset()  # the next model starts with empty caches


class _UntilDeadline:
    """The loader, ending the epoch early when `deadline` (time.monotonic()) passes."""

    def __init__(self, loader: Any, deadline: float) -> None:
        self.loader, self.deadline, self.batches = loader, deadline, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if time.monotonic() >= self.deadline:
                return
            self.batches += 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _epoch_and_bf16_check(report: Report, scale: Scale, device: str, budget: Budget) -> None:
    """One PGD-10 AT epoch of WRN-28-10 (timed), then PGD-20 in fp32 vs bf16 on its model."""
    from ..robustness.evaluation import pgd_accuracy

    cfg = bench_config("pgd_at", scale.arch or "wrn-28-10", scale.batch, device=device,
                             precision="bf16", model_args=scale.model_args)
    cfg = dataclasses.replace(cfg, drop_last=False, eps=EPS)  # 50,000 / 128 = 391 steps
    b = make_bench(cfg, steps=0, data=class_pattern_images(scale.epoch_images, seed=1))
    fastpath.prepare_model(b.model, cfg, b.device)
    ctx = b.context()
    loader = _UntilDeadline(ctx.loader, budget.deadline - scale.check_reserve_s)
    ctx.loader = loader
    torch.manual_seed(0)
    fastpath.synchronize(b.device)
    t0 = time.perf_counter()
    with fastpath.autocast(cfg, b.device):
        stats = b.method.train_epoch(ctx)
    fastpath.synchronize(b.device)
    seconds = time.perf_counter() - t0
    steps = len(loader.loader)
    report.epoch = {
        "method": "pgd_at", "arch": cfg.arch, "steps": loader.batches, "steps_per_epoch": steps,
        "batch": cfg.batch_size, "images": scale.epoch_images, "precision": "bf16",
        "channels_last": fastpath.uses_channels_last(cfg, b.device), "compile": False,
        "seconds": round(seconds, 3),
        "seconds_per_epoch": round(seconds * steps / max(loader.batches, 1), 3),
        "complete": loader.batches == steps, **{k: round(v, 4) for k, v in stats.items()}}
    line = (f"PGD-10 AT epoch, {cfg.arch}, {loader.batches}/{steps} steps of {cfg.batch_size}: "
            f"{seconds:.1f} s")
    if loader.batches < steps:
        line += (f" (stopped for the budget; a whole epoch "
                 f"~{report.epoch['seconds_per_epoch']:.0f} s)")
    print(line, flush=True)

    x, y = class_pattern_images(scale.check_images, seed=2)
    acc = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same random starts
        with fastpath.autocast(dataclasses.replace(cfg, precision=precision), b.device):
            acc[precision] = pgd_accuracy(b.model, x, y, eps=EPS, alpha=EPS / 4, steps=20,
                                          batch=500, device=b.device)
    diff = abs(acc["bf16"] - acc["fp32"])
    report.bf16_check = {
        "model": f"{cfg.arch} after the PGD-10 AT epoch above", "images": len(y),
        "attack": "PGD-20, eps 8/255, alpha 2/255, one random start, eval mode",
        "pgd20_acc_fp32": round(acc["fp32"], 2), "pgd20_acc_bf16": round(acc["bf16"], 2),
        "difference_pp": round(diff, 2), "tolerance_pp": AGREEMENT_PP,
        "agree": diff <= AGREEMENT_PP,
        "fp32_convolutions": "TF32" if b.device.type == "cuda" and
        torch.backends.cudnn.allow_tf32 else "fp32",  # as the evaluation protocol runs them
        "conclusive": 5.0 <= acc["fp32"] <= 95.0}  # at 0% or 100% agreement says nothing
    print(f"PGD-20 accuracy fp32 {acc['fp32']:.2f}% vs bf16 {acc['bf16']:.2f}% on {len(y)} "
          f"images: {'agree' if diff <= AGREEMENT_PP else 'DISAGREE'} (|diff| {diff:.2f} pp, "
          f"tolerance {AGREEMENT_PP} pp)", flush=True)


# --- what is benched, and Table 1 at paper scale ----------------------------------------------

def bench_pairs() -> tuple[tuple[str, str], ...]:
    """(method, paper-scale architecture) of every run a Table 1 row trains, its natural
    pre-training included, then one pair for each method only a later experiment trains: read
    from the experiment files, so a new row is benched without editing a list. Compiled
    benches run in this order and the budget cuts the last: the rows Table 1's paired
    comparisons use come first (AFT, PGD AT), then its other rows in the file's order, then the
    pre-trainings, then the later experiments' methods."""
    from ..experiment import load_experiment
    from ..training.methods import resolve_row
    from ..training.pipeline import pretrain_config

    table1 = load_experiment(EXPERIMENTS[0])
    compared = [table1.source_row(r) for pair in table1.pairs for r in pair]
    trained = [table1.source_row(r) for r in table1.row_ids]  # a view trains nothing
    configs = [resolve_row(table1, r, "paper") for r in dict.fromkeys(compared + trained)]
    pairs = [(c.method, c.arch) for c in configs]
    pairs += [(p.method, p.arch) for p in (pretrain_config(c) for c in configs
                                           if c.pretrain is not None)]
    for name in EXPERIMENTS[1:]:
        exp = load_experiment(name)
        for row in exp.rows:
            if "view_of" not in row and row["method"] not in {m for m, _ in pairs}:
                cfg = resolve_row(exp, row["id"], "paper")
                pairs.append((cfg.method, cfg.arch))
    return tuple(dict.fromkeys(pairs))


def table1_hours(report: Report) -> list[dict[str, Any]]:
    """Each Table 1 row: its epochs × its per-epoch time (the faster of eager and compiled),
    plus an AFT row's natural pre-training; None where a needed pair was not measured."""
    from ..experiment import load_experiment
    from ..training.methods import resolve_row
    from ..data.registry import EXTRA_DATA
    from ..training.pipeline import pretrain_config

    exp = load_experiment("table1")
    rows = []
    for row_id in dict.fromkeys(exp.source_row(r) for r in exp.row_ids):  # a view trains nothing
        method = exp.row(row_id)["method"]
        cfg = resolve_row(exp, row_id, "paper")
        best = _fastest(report, method, cfg.arch)
        row: dict[str, Any] = {"row": row_id, "method": method, "arch": cfg.arch,
                               "epochs": cfg.epochs, "recipe_batch": cfg.batch_size}
        hours = None
        if best is not None:
            images = dataset_info(cfg.dataset).train_size
            hours = cfg.epochs * images / best["images_per_s"] / 3600
            row.update(mode="compiled" if best["compile"] else "eager",
                       images_per_s=best["images_per_s"],
                       seconds_per_epoch=best["seconds_per_epoch"],
                       mfu_datasheet=best["mfu_datasheet"], mfu_measured=best["mfu_measured"])
        if cfg.pretrain is not None and hours is not None:
            pre = pretrain_config(cfg)
            pre_best = _fastest(report, "natural", pre.arch)
            extra = EXTRA_DATA.get(pre.extra_data or "")  # pseudo-label: in the subset's count
            images = dataset_info(pre.dataset).train_size + (extra.train_size if extra else 0)
            row.update(pretrain_epochs=pre.epochs, pretrain_images=images,
                       pretrain_images_per_s=None if pre_best is None else
                       pre_best["images_per_s"])
            hours = None if pre_best is None else \
                hours + pre.epochs * images / pre_best["images_per_s"] / 3600
        row["hours"] = None if hours is None else round(hours, 2)
        rows.append(row)
    return rows


def _fastest(report: Report, method: str, arch: str) -> dict[str, Any] | None:
    measured = [e for (m, a, _c), e in report.entries.items() if (m, a) == (method, arch)]
    return max(measured, key=lambda e: e["images_per_s"], default=None)


def format_table(report: Report, rows: list[dict[str, Any]]) -> str:
    """The printed summary: one line per Table 1 row."""
    def ips(method: str, arch: str, compiled: bool) -> str:
        e = report.entries.get((method, arch, compiled))
        return "-" if e is None else f"{e['images_per_s']:,.0f}"

    def mfu(r: dict[str, Any]) -> str:
        if r.get("mfu_datasheet") is not None:
            return f"{100 * r['mfu_datasheet']:.1f}%"
        return "-" if r.get("mfu_measured") is None else f"{100 * r['mfu_measured']:.1f}% GEMM"

    lines = ["| Table 1 row | arch | img/s eager | img/s compiled | s/epoch | MFU | epochs | "
             "hours |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        epochs = str(r["epochs"]) + (f" + {r['pretrain_epochs']} pre-train"
                                     if "pretrain_epochs" in r else "")
        spe = "-" if "seconds_per_epoch" not in r else f"{r['seconds_per_epoch']:,.1f}"
        hours = "-" if r["hours"] is None else f"{r['hours']:,.2f}"
        lines.append(f"| {r['row']} | {r['arch']} | {ips(r['method'], r['arch'], False)} | "
                     f"{ips(r['method'], r['arch'], True)} | {spe} | {mfu(r)} | {epochs} | "
                     f"{hours} |")
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------

def _gpu_info(device: torch.device) -> dict[str, Any]:
    """The GPU, and what nvidia-smi says about power and clocks (SXM or PCIe matters for MFU)."""
    if device.type != "cuda":
        return {"device": device_name(device)}
    props = torch.cuda.get_device_properties(device)
    gpu = gpu_of(props.name)
    info: dict[str, Any] = {"device": props.name,
                            "plan_gpu": None if gpu is None else gpu.name,  # plan --gpu NAME
                            "peak_tflops": None if gpu is None else gpu.peak_tflops,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "sms": props.multi_processor_count, "cuda": torch.version.cuda}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm,"
                              "clocks.max.memory", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget of the measurements (default {DEFAULT_BUDGET_S:.0f}; "
                        "what does not fit is skipped and listed)")
    p.add_argument("--results-dir", default="results", help="writes <dir>/bench/<gpu>.json")
    p.add_argument("--device", default="auto", help=argparse.SUPPRESS)  # tests: cpu (+ --tiny)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.budget_s < 0:
        raise ConfigError(f"--budget-s must be >= 0, got {args.budget_s:g}")
    if args.device == "auto" and not torch.cuda.is_available():
        print("gpucheck: no CUDA GPU found; nothing measured (it needs one GPU, <= 8 minutes)")
        return 0
    from ..runtime.environment import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.tiny:
        raise ConfigError("gpucheck measures a GPU: --device cpu is for the tests (with --tiny)")
    budget = Budget(args.budget_s)
    scale = TINY if args.tiny else GPU
    if args.tiny:
        torch.set_num_threads(1)  # the tests' CPU is shared: more threads stall in OpenMP
    report = Report()
    name = device_slug(device) + ("-tiny" if args.tiny else "")
    path = Path(args.results_dir) / "bench" / f"{name}.json"
    info = _gpu_info(device)
    print(f"gpucheck on {info['device']}: budget {args.budget_s:.0f} s", flush=True)
    dev = str(device)
    pairs = bench_pairs()
    for method, arch in pairs:
        run_piece(f"bench {method} {arch} eager", scale.min_bench_s, budget, report,
                   lambda m=method, a=arch: _measure(report, scale, dev, m, a, False))
    run_piece("PGD-10 AT epoch of wrn-28-10 + bf16-vs-fp32 PGD-20 check", scale.min_epoch_s,
               budget, report, lambda: _epoch_and_bf16_check(report, scale, dev, budget))
    for method, arch in pairs[:scale.compiled_pairs]:
        run_piece(f"bench {method} {arch} compiled", scale.min_compiled_s, budget, report,
                   lambda m=method, a=arch: _measure(report, scale, dev, m, a, True))

    rows = table1_hours(report)
    for entry in report.entries.values():
        bench.write_entry(entry, path)
    data = layout.read_json(path) or {"device": info["device"], "entries": []}
    data["gpucheck"] = {
        **info, "tiny": bool(args.tiny), "budget_s": args.budget_s,
        "elapsed_s": round(budget.elapsed(), 1), "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "batch": scale.batch,
        "pgd10_epoch": report.epoch, "bf16_vs_fp32_pgd20": report.bf16_check,
        "table1_hours": rows, "skipped": report.skipped, "failed": report.failed,
        "failed_tracebacks": report.tracebacks}
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(path, data)
    print(format_table(report, rows))
    if report.skipped:
        print(f"skipped (budget {args.budget_s:.0f} s): {'; '.join(report.skipped)}")
    for failure in report.failed:
        print(f"failed: {failure}")
    print(f"wrote {path} ({budget.elapsed():.0f} s)")
    return 1 if report.failed else 0
