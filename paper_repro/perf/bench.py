"""`python -m paper_repro bench`: throughput, FLOPs and MFU of one method's training step.

    python -m paper_repro bench --method pgd_at --arch wrn-28-10 --batch 128 [--compile]
    python -m paper_repro bench --all            # every method on the grid, on a GPU

What it does, on synthetic data of the dataset's shape (uint8 noise, random labels, the
method's own augmentation on the device):
1. FLOPs per image: `torch.utils.flop_counter` over one real training step of the method, the
   attack included (`flops.TotalFlopCounter`). These are the FLOPs the step really launches; our
   attacks skip weight gradients, so they equal the useful FLOPs of performance.md §3.
2. Weight-gradient probe: one more step with every attack-only pass (`attacks._input_gradient`,
   YOPO's `layer_one_steps`) watched by a dispatch mode that flags any op computing a parameter
   gradient (a `*_backward` op whose `output_mask` asks for weight or bias, or a backward matmul
   of a Linear weight's shape), and by a before/after check of every parameter's `.grad`.
   With --compile, one more step after the timed ones: the compiled graphs that attack passes
   run must return no parameter gradient from their backward graphs (`CompiledGraphProbe`,
   the compile backend wrapped so that it sees each backward graph: inside a compiled region
   the dispatch mode sees no ops, and `.grad` stays untouched even when weight gradients are
   computed, pytorch#132929). Dynamo compilations during the timed passes are counted too.
3. `--warmup` steps (cuDNN autotuning, compilation), then `--steps` timed steps (one epoch over
   the synthetic set) between device synchronisations.
4. With `--baseline-loop` (pgd_at, aft): the same PGD-k AT step with the attack written as the
   reference repos write it (`loss.backward()` with the parameters requiring grad, so every
   attack iteration also computes and accumulates weight gradients), timed the same way.
MFU = achieved FLOP/s ÷ the device's dense datasheet peak (gpus.py: bf16; V100 fp16; the
table plan applies the MFU against), and ÷ a measured GEMM peak
(a large matmul in the run's compute dtype). One entry per (method, arch, batch, compile,
precision, dataset) is merged into results/bench/<device>.json.

The step it times is harness.py's (the method's recipe on synthetic data, driven pass by pass);
the probes it runs live in probes.py, the device names and peaks in gpus.py, the GPU check in
gpucheck.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..training.adversarial import adversarial_epoch

from ..store import files, layout
from ..runtime import fastpath
from ..robustness.attacks import LinfThreat
from ..config import RunConfig
from ..data import dataset_info
from ..errors import ConfigError
from ..training.flops import TotalFlopCounter
from .gpus import datasheet_peak, device_name, device_slug
from .harness import Bench, bench_config, make_bench
from ..training.methods import Context, get_method, list_methods
from .probes import CompiledGraphProbe, ProbeReport, probing_attacks

GRID_ARCHS = ("preact-resnet18", "wrn-28-10", "wrn-34-10")
GRID_BATCHES = (128, 512)


def grid() -> list[tuple[str, str, int, bool]]:
    """`bench --all`: (method, arch, batch, with the baseline loop) for every registered method
    (the registry, so a new method is benched without editing a list) on every grid
    architecture and batch; the baseline loop beside every method whose step is PGD AT's."""
    return [(m, a, b, get_method(m).pgd_at_step) for a in GRID_ARCHS for m in list_methods()
            for b in GRID_BATCHES]


# --- the reference repos' PGD-k AT step (the --baseline-loop) -------------------------------

def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                  alpha: float, steps: int, random_start: bool = True) -> torch.Tensor:
    """PGD-k as locuslab/fast_adversarial and Bag-of-Tricks `attack_pgd` compute it: a mean CE
    and `loss.backward()` with the parameters requiring grad, so each iteration also computes
    (and accumulates into `.grad`) every weight gradient. Same update order and projection as
    `attacks.pgd`, so both give the same adversarial examples; only the gradient work differs.
    """
    threat = LinfThreat(eps)
    x = x.detach()
    delta = threat.random_start(x) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta).float(), y)
        loss.backward()
        with torch.no_grad():
            delta = threat.clamp_to_image(x, threat.project(threat.step(delta, delta.grad,
                                                                        alpha)))
    return (x + delta).detach()


def reference_attack_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          **pgd_args: Any) -> torch.Tensor:
    """`reference_pgd`, then the references' zero_grad before the update (the attack's weight
    gradients must not reach it): the attack of the baseline's `adversarial_epoch`."""
    x_adv = reference_pgd(model, x, y, **pgd_args)
    model.zero_grad(set_to_none=True)
    return x_adv


# --- measurements ---------------------------------------------------------------------------

def _timed(bench: Bench, epoch_fn: Callable[[Context], dict[str, float]], steps: int) -> float:
    """Seconds for `steps` minibatches of `epoch_fn`, between device synchronisations."""
    fastpath.synchronize(bench.device)
    t0 = time.perf_counter()
    bench.run(epoch_fn, max_batches=steps)
    fastpath.synchronize(bench.device)
    return time.perf_counter() - t0


class GemmPeak:
    """Attainable dense GEMM throughput: a large square matmul in `dtype`, timed in rounds
    interleaved with the timed training passes, so both see the same machine load."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.n, self.reps = (8192, 20) if device.type == "cuda" else (2048, 1)
        self.a = torch.randn(self.n, self.n, device=device, dtype=dtype)
        self.b = torch.randn(self.n, self.n, device=device, dtype=dtype)
        self.best = float("inf")
        for _ in range(3):
            self.a @ self.b  # warm-up

    def time_round(self) -> None:
        fastpath.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.a @ self.b
        fastpath.synchronize(self.device)
        self.best = min(self.best, time.perf_counter() - t0)

    @property
    def tflops(self) -> float:
        return 2 * self.n ** 3 * self.reps / self.best / 1e12


def measure(method: str, arch: str, batch: int, *, dataset: str = "cifar10",
            device: str = "auto", precision: str = "auto", channels_last: bool | None = None,
            compile: bool = False, warmup: int = 3, steps: int = 10, repeats: int = 3,
            baseline_loop: bool = False, model_args: dict | None = None,
            compile_backend: str = "inductor") -> dict[str, Any]:
    """Benchmark one configuration; returns its JSON entry (see the module docstring).

    The timed pass is repeated `repeats` times (alternating with the baseline loop's, if any)
    and the fastest is kept: on a shared machine the minimum is the least disturbed figure.
    `compile_backend` "aot_eager" is for CPU tests (inductor's C++ compile takes minutes there).
    """
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ConfigError("bench: --steps and --repeats must be >= 1, --warmup >= 0")
    if baseline_loop and not get_method(method).pgd_at_step:
        pgd_at_steps = [m for m in list_methods() if get_method(m).pgd_at_step]
        raise ConfigError(f"--baseline-loop compares PGD-k AT steps: use it with "
                          f"{' or '.join(pgd_at_steps)}, not '{method}'")
    cfg = bench_config(method, arch, batch, dataset=dataset, device=device,
                       precision=precision, channels_last=channels_last, compile=compile,
                       model_args=model_args)
    bench = make_bench(cfg, steps=max(steps, warmup, 1))
    dev, model = bench.device, bench.model
    fastpath.prepare_model(model, dataclasses.replace(cfg, compile=False), dev)

    with TotalFlopCounter() as counter:  # one real step, eager
        bench.run(bench.method.train_epoch, max_batches=1)
    gflop_per_image = counter.get_total_flops() / batch / 1e9
    with probing_attacks(model) as probe:  # eager, every op visible to the dispatch mode
        bench.run(bench.method.train_epoch, max_batches=1)
    graphs = CompiledGraphProbe(model, compile_backend) if compile else None
    if compile:  # compiles in place; the rest is already done
        fastpath.prepare_model(model, cfg, dev, backend=graphs)
    ours = bench.method.train_epoch
    reference = functools.partial(adversarial_epoch, settings=bench.method.settings,
                                  attack=reference_attack_step)
    contenders = [ours, reference] if baseline_loop else [ours]
    for epoch_fn in contenders:
        if warmup:
            bench.run(epoch_fn, max_batches=warmup)
    compilations = _dynamo_compilations()
    resolved = fastpath.resolve_precision(cfg, dev)
    gemm = GemmPeak(dev, torch.bfloat16 if resolved == "bf16" else torch.float32)
    times: dict[Any, list[float]] = {fn: [] for fn in contenders}
    for _ in range(repeats):
        gemm.time_round()
        for epoch_fn in contenders:
            times[epoch_fn].append(_timed(bench, epoch_fn, steps))
    gemm.time_round()
    seconds = min(times[ours])
    recompiles = _dynamo_compilations() - compilations  # during the timed passes: should be 0
    compiled_probe = ProbeReport()
    if compile:  # the compiled attack passes: their backward graphs, and .grad untouched
        with probing_attacks(model, dispatch=False, graphs=graphs) as compiled_probe:
            bench.run(bench.method.train_epoch, max_batches=1)
        probe.grads_touched += compiled_probe.grads_touched

    images_per_s = batch * steps / seconds
    entry = _entry(cfg, bench, resolved, gflop_per_image, images_per_s, gemm, probe,
                   compiled_probe, warmup=warmup, steps=steps, repeats=repeats)
    if compile:
        entry.update(compile_backend=compile_backend, recompiles_while_timed=recompiles)
    if baseline_loop:
        entry.update(_baseline_fields(bench, cfg, reference, min(times[reference]), steps,
                                      images_per_s))
    return entry


def _entry(cfg: RunConfig, bench: Bench, resolved: str, gflop_per_image: float,
           images_per_s: float, gemm: GemmPeak, probe: ProbeReport,
           compiled_probe: ProbeReport, *, warmup: int, steps: int,
           repeats: int) -> dict[str, Any]:
    """The JSON entry of one measured configuration (the keys of the module docstring)."""
    method, arch, batch, dataset = cfg.method, cfg.arch, cfg.batch_size, cfg.dataset
    compile, dev = cfg.compile, bench.device
    tflops = gflop_per_image * images_per_s / 1e3
    peak = datasheet_peak(dev)
    attack_free = probe.attack_calls == 0
    entry: dict[str, Any] = {
        "method": method, "arch": arch, "batch": batch, "dataset": dataset,
        "compile": compile, "precision": resolved,
        "channels_last": fastpath.uses_channels_last(cfg, dev),
        "device": device_name(dev), "warmup_steps": warmup, "timed_steps": steps,
        "repeats": repeats,
        "optimizer_steps_per_batch": bench.replays,
        "images_per_s": round(images_per_s, 2),
        "seconds_per_epoch": round(dataset_info(dataset).train_size / images_per_s, 3),
        "epoch_images": dataset_info(dataset).train_size,
        "gflop_per_image": round(gflop_per_image, 4),
        "tflops": round(tflops, 4),
        "peak_datasheet_tflops": peak,
        "mfu_datasheet": None if peak is None else round(tflops / peak, 4),
        "gemm_peak_tflops": round(gemm.tflops, 4), "gemm_dtype": resolved,
        "mfu_measured": round(tflops / gemm.tflops, 4),
        "wgrad_in_attack": None if attack_free else
        bool(probe.wgrad_ops) or probe.grads_touched > 0 or compiled_probe.compiled_wgrads > 0,
        "wgrad_ops_in_attack": dict(probe.wgrad_ops),
        "attack_passes_probed": probe.attack_calls,
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if compile:
        entry.update(compiled_attack_graphs=compiled_probe.compiled_graphs,
                     compiled_wgrads_in_attack=compiled_probe.compiled_wgrads)
    notes = _notes(compiled_probe, peak is None, dev, attack_free, bench.replays)
    if notes:
        entry["notes"] = notes
    return entry


def _notes(compiled_probe: ProbeReport, no_peak: bool, dev: torch.device, attack_free: bool,
           replays: int) -> list[str]:
    """What a reader of the entry must know to read its numbers right."""
    notes = []
    if compiled_probe.compiled_unverified:
        notes.append("wgrad_in_attack: a compiled attack graph's backward was not inspected")
    if no_peak:
        notes.append("mfu_datasheet: no datasheet peak for this device (gpus.py)"
                     + (" (CPU)" if dev.type != "cuda" else ""))
    if attack_free:
        notes.append("wgrad_in_attack: the method has no attack-only passes (each pass also "
                     "updates the weights)")
    if replays > 1:
        notes.append(f"an epoch is one pass over the data with {replays} replays per "
                     "minibatch")
    return notes


def _baseline_fields(bench: Bench, cfg: RunConfig, reference: Callable, seconds: float,
                     steps: int, images_per_s: float) -> dict[str, Any]:
    """The reference repos' loop (--baseline-loop): its speed, FLOPs and our speed-up."""
    with TotalFlopCounter() as ref_counter, fastpath.eager(cfg):
        bench.run(reference, max_batches=1)
    ref_images_per_s = cfg.batch_size * steps / seconds
    return {"baseline_images_per_s": round(ref_images_per_s, 2),
            "baseline_seconds_per_epoch": round(dataset_info(cfg.dataset).train_size
                                                / ref_images_per_s, 3),
            "baseline_gflop_per_image": round(ref_counter.get_total_flops()
                                              / cfg.batch_size / 1e9, 4),
            "speedup_vs_baseline_loop": round(images_per_s / ref_images_per_s, 3)}


def _dynamo_compilations() -> int:
    """Frames dynamo has compiled (or tried to) so far: a cache hit does not count."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


# --- the store ------------------------------------------------------------------------------

_KEY = ("method", "arch", "batch", "compile", "precision", "dataset")


def write_entry(entry: dict[str, Any], path: Path) -> None:
    """Merge `entry` into the device's JSON (one entry per key, the newest measurement wins)."""
    data = layout.read_json(path) or {"device": entry["device"], "entries": []}
    key = tuple(entry[k] for k in _KEY)
    kept = [e for e in data.get("entries", []) if tuple(e.get(k) for k in _KEY) != key]
    data["device"] = entry["device"]
    data["entries"] = sorted([*kept, entry], key=lambda e: tuple(str(e.get(k)) for k in _KEY))
    files.atomic_write_json(path, data)


def summary_line(e: dict[str, Any]) -> str:
    mfu = "n/a" if e["mfu_datasheet"] is None else f"{100 * e['mfu_datasheet']:.1f}%"
    line = (f"{e['method']} {e['arch']} b{e['batch']}{' compiled' if e['compile'] else ''} "
            f"{e['precision']}: {e['images_per_s']:.1f} img/s, {e['seconds_per_epoch']:.1f} "
            f"s/epoch, {e['gflop_per_image']:.3f} GFLOP/img, {e['tflops']:.3f} TFLOP/s, MFU "
            f"{mfu} datasheet / {100 * e['mfu_measured']:.1f}% measured GEMM, wgrad in attack: "
            f"{e['wgrad_in_attack']}")
    if "speedup_vs_baseline_loop" in e:
        line += f", {e['speedup_vs_baseline_loop']:.2f}x the backward()-in-attack loop"
    return line


# --- command line ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pgd_at", help="training method (default pgd_at)")
    p.add_argument("--arch", default="preact-resnet18", help="model (default preact-resnet18)")
    p.add_argument("--batch", type=int, default=128, help="minibatch size (default 128)")
    p.add_argument("--dataset", default="cifar10",
                   help="shape of the synthetic data: cifar10 (3x32x32), fashion-mnist (1x28x28)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes, the fastest kept (default 3)")
    p.add_argument("--baseline-loop", action="store_true",
                   help="also time the reference repos' loss.backward()-in-attack PGD AT step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. --set model_args.width=4")
    p.add_argument("--all", action="store_true",
                   help=f"the grid {'/'.join(GRID_ARCHS)} x every method x batch "
                        f"{'/'.join(map(str, GRID_BATCHES))} (PGD AT's steps with "
                        "--baseline-loop)")
    p.add_argument("--results-dir", default="results", help="writes <dir>/bench/<device>.json")


def main(args: argparse.Namespace) -> int:
    from ..config import parse_override
    from ..runtime.environment import resolve_device

    model_args: dict[str, Any] = {}
    for text in args.set:
        key, value = parse_override(text)
        if key != "model_args" or not isinstance(value, dict):
            raise ConfigError(f"bench --set takes model_args.<option>=<value>, got '{text}'")
        model_args.update(value)
    path = Path(args.results_dir) / "bench" / f"{device_slug(resolve_device(args.device))}.json"
    todo = grid() if args.all else [(args.method, args.arch, args.batch, args.baseline_loop)]
    for method, arch, batch, baseline in todo:
        try:
            entry = measure(method, arch, batch, dataset=args.dataset, device=args.device,
                            precision=args.precision, compile=args.compile,
                            warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                            baseline_loop=baseline,
                            model_args=model_args)
        except torch.OutOfMemoryError:
            if not args.all:
                raise ConfigError(f"out of device memory at batch {batch}") from None
            print(f"{method} {arch} b{batch}: out of device memory, skipped")
            torch.cuda.empty_cache()
            continue
        write_entry(entry, path)
        print(summary_line(entry))
    print(f"wrote {path}")
    return 0
