"""The GPU fast path, exercised on the CPU for every registered method (issue 15, item 1).

The methods are the registry's (`list_methods()`, REPRO_PLUGINS included) and where each one's
attack-only passes run is what its class declares (`Method.attack_passes`): a new method gets
every check below without editing this file (tests/test_adding_a_method.py proves it).

Each method takes 3-4 optimiser steps at smoke scale (width-4 cnn-small, batch 8, synthetic
Fashion-MNIST-shaped data, the method's own recipe, driven the way `bench` drives it) under
  - precision="bf16" (CPU autocast): every conv/linear output is bf16;
  - channels_last: conv weights and conv outputs stay NHWC through the optimiser steps;
  - compile=True: dynamo compiles the model, nothing recompiles after the first two steps,
    the compiled graphs that attack passes run compute no parameter gradient (their backward
    graphs, inspected by `probes.CompiledGraphProbe`), and no parameter's .grad is touched;
and the losses are finite. The first step's loss is compared with fp32 eager from the same
seed, data and initial weights. Tolerances:
  - bf16: |Δ| <= 0.01 + 1% of the loss (~0.035 here; measured: <= 0.0032). bf16 keeps 8 bits
    of mantissa (~0.4% per logit), and an attack's sign steps can turn where a gradient is near
    zero.
  - channels_last, compiled fp32: |Δ| <= 1e-4 × max(1, loss) (measured: <= 5e-7): only the
    order of float sums may change. TRADES's KL attack (trades, trades_awp) starts at x + 0.001·N,
    where KL(f(x) ‖ f(x_adv)) and its gradient are ~0, so the sign of some gradient entries is
    the sign of rounding noise and the order of sums moves x_adv: 1e-3 × max(1, loss) there
    (measured: trades_awp channels_last 4.8e-4 at loss 2.36).
A compiled run's checkpoint (runner.train_run, compile=True) loads into an eager model, which
reproduces the run's clean accuracy.

Compile backend: "aot_eager" for every method, plus inductor (bf16 + channels_last + compile,
the GPU's configuration) for pgd_at alone. Why: on this project's 2-core CI machine inductor's
C++ code generation takes about a minute per method (pgd_at: 61 s), too long for every
registered method. aot_eager runs everything dynamo and AOT autograd do (tracing, guards,
recompiles, the joint forward/backward graph that decides which gradients a backward computes,
the partitioning) and skips only the code generation; PGD AT's step is the attack/update pair
that AFT also runs, so inductor sees the pattern that matters most.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Iterator

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from paper_repro import results
from paper_repro.runtime import fastpath
from paper_repro.perf import probes
from paper_repro.perf import harness
from paper_repro.perf.harness import Bench
from paper_repro.data import dataset_info, load_arrays
from paper_repro.errors import DataError
from paper_repro.robustness.evaluation import clean_accuracy
from paper_repro.models import create_model
from paper_repro.training.methods import get_method, list_methods
from paper_repro.training.runner import train_run
from conftest import tiny_config

METHODS = tuple(list_methods())
BATCH = 8
BF16_ATOL, BF16_RTOL = 0.01, 0.01
FP32_RTOL = 1e-4
FP32_RTOL_KL_ATTACK = {"trades": 1e-3, "trades_awp": 1e-3}  # see the module docstring


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU is shared: one thread avoids OpenMP oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bench(method: str, **fast: object) -> Bench:
    """The method's recipe on a width-4 cnn-small, 4 minibatches of synthetic data, the model
    prepared by the fast path but not compiled yet (as `bench.measure` does). The initial
    weights and data depend only on the seed, so every variant starts equal."""
    cfg = harness.bench_config(method, "cnn-small", BATCH, dataset="fashion-mnist",
                             device="cpu", model_args={"width": 4}, **fast)
    b = harness.make_bench(dataclasses.replace(cfg, eps=0.1), steps=4)
    fastpath.prepare_model(b.model, dataclasses.replace(b.cfg, compile=False), b.device)
    return b


def _losses(b: Bench, steps: int, *, seed: bool = True) -> list[float]:
    """Take `steps` optimiser steps one at a time, each a (partial) epoch under the fast
    path's autocast as the runner runs it (`Bench.run`); their losses."""
    if seed:
        torch.manual_seed(1)  # attack random starts: the same in every variant
    return [b.run(b.method.train_epoch, max_steps=1)["train_loss"] for _ in range(steps)]


@functools.cache
def _fp32_eager_first_loss(method: str) -> float:
    return _losses(_bench(method, precision="fp32"), 1)[0]


def _assert_trained(b: Bench, losses: list[float]) -> None:
    assert b.global_step == len(losses) >= 3
    assert all(math.isfinite(v) for v in losses), losses


def _assert_close_to_fp32_eager(method: str, first: float, *, bf16: bool) -> None:
    ref = _fp32_eager_first_loss(method)
    rtol = FP32_RTOL_KL_ATTACK.get(method, FP32_RTOL)
    tol = BF16_ATOL + BF16_RTOL * abs(ref) if bf16 else rtol * max(1.0, abs(ref))
    assert abs(first - ref) <= tol, f"first loss {first} vs fp32 eager {ref} (tolerance {tol})"


@contextlib.contextmanager
def _outputs_of(model: nn.Module, kinds: tuple[type, ...],
                check: Callable[[torch.Tensor], bool]) -> Iterator[list[bool]]:
    """check(output) for every forward of a module of `kinds` inside the block."""
    seen: list[bool] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(check(out)))
               for m in model.modules() if isinstance(m, kinds)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _is_nhwc(t: torch.Tensor) -> bool:
    """channels_last strides; a tensor with one channel or one pixel is both layouts at once,
    so only tensors that can tell the two apart count."""
    if t.size(1) == 1 or t.size(2) * t.size(3) == 1:
        return True
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_trains_every_method_on_the_cpu(method):
    b = _bench(method, precision="bf16")
    assert fastpath.resolve_precision(b.cfg, b.device) == "bf16"  # honoured on the CPU
    with _outputs_of(b.model, (nn.Conv2d, nn.Linear), lambda o: o.dtype == torch.bfloat16) \
            as in_bf16:
        losses = _losses(b, 3)
    _assert_trained(b, losses)
    assert len(in_bf16) >= 3 * 3 and all(in_bf16), "a conv/linear ran outside bf16 autocast"
    assert all(p.dtype == torch.float32 for p in b.model.parameters())  # master weights
    _assert_close_to_fp32_eager(method, losses[0], bf16=True)


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_trains_every_method_in_nhwc(method):
    b = _bench(method, precision="fp32", channels_last=True)
    assert any(w.size(1) > 1 for w in _conv_weights(b.model))  # a weight that can tell
    with _outputs_of(b.model, (nn.Conv2d,), _is_nhwc) as nhwc:
        losses = _losses(b, 3)
    _assert_trained(b, losses)
    assert len(nhwc) >= 3 and all(nhwc), "a conv ran in NCHW"
    assert all(_is_nhwc(w) for w in _conv_weights(b.model)), "the optimiser lost NHWC"
    _assert_close_to_fp32_eager(method, losses[0], bf16=False)


COMPILE_CASES = [pytest.param(m, "aot_eager", {}, id=f"{m}-aot_eager") for m in METHODS] + [
    pytest.param("pgd_at", "inductor", {"precision": "bf16", "channels_last": True},
                 id="pgd_at-inductor-bf16-channels_last")]


@pytest.mark.parametrize("method,backend,fast", COMPILE_CASES)
def test_compiled_training_does_not_recompile_or_compute_weight_gradients_in_attacks(
        method, backend, fast):
    torch._dynamo.reset()  # every case compiles from scratch, whatever ran before
    fast = {"precision": "fp32", "channels_last": False, **fast}
    b = _bench(method, compile=True, **fast)
    graphs = probes.CompiledGraphProbe(b.model, backend)
    fastpath.prepare_model(b.model, b.cfg, b.device, backend=graphs)
    frames = counters["frames"]["total"]
    losses = _losses(b, 2)  # the first steps compile every graph an epoch needs
    compiled = counters["frames"]["total"]
    assert compiled > frames and graphs.graphs, "the model was not compiled"
    kind = get_method(method).attack_passes  # through the compiled model, eagerly, or none
    with probes.probing_attacks(b.model, dispatch=kind == "eager", graphs=graphs) as probe:
        losses += _losses(b, 2, seed=False)
    assert counters["frames"]["total"] == compiled, "recompiled after the first steps"
    _assert_trained(b, losses)
    _assert_close_to_fp32_eager(method, losses[0], bf16=fast["precision"] == "bf16")
    if fast["channels_last"]:
        assert all(_is_nhwc(w) for w in _conv_weights(b.model))
    if kind is None:
        assert probe.attack_calls == 0
        return
    assert probe.attack_calls >= 2 and probe.grads_touched == 0
    assert probe.compiled_wgrads == 0 and probe.compiled_unverified == 0
    if kind == "compiled":
        assert probe.compiled_graphs >= 1  # the attack really ran compiled code
    else:
        assert probe.compiled_graphs == 0 and not probe.wgrad_ops


def test_the_compiled_graph_probe_sees_weight_gradients_when_attacks_do_not_freeze(
        monkeypatch):
    """pytorch#132929: without frozen parameters the compiled backward computes their
    gradients although autograd.grad asks for the input's only, and .grad stays untouched."""
    monkeypatch.setattr("paper_repro.robustness.attacks.frozen_parameters",
                        lambda model: contextlib.nullcontext())
    torch._dynamo.reset()
    b = _bench("pgd_at", precision="fp32", compile=True)
    graphs = probes.CompiledGraphProbe(b.model, "aot_eager")
    fastpath.prepare_model(b.model, b.cfg, b.device, backend=graphs)
    _losses(b, 1)
    with probes.probing_attacks(b.model, dispatch=False, graphs=graphs) as probe:
        _losses(b, 1, seed=False)
    assert probe.grads_touched == 0  # the .grad check alone would miss it
    assert probe.compiled_graphs >= 1 and probe.compiled_wgrads > 0


def test_a_compiled_runs_checkpoint_loads_into_an_eager_model(tmp_path, monkeypatch):
    try:
        test_x, test_y = load_arrays("fashion-mnist", None, train=False)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "aot_eager")  # see the module docstring
    torch._dynamo.reset()
    frames = counters["frames"]["total"]
    cfg = tiny_config(tmp_path, method="pgd_at", epochs=2, compile=True)
    record = train_run(cfg, quiet=True)  # epoch 1 counts FLOPs eagerly; epoch 2 runs compiled
    assert record["status"] == "done" and record["compiled"] is True
    assert counters["frames"]["total"] > frames, "the run did not compile"
    ckpt = torch.load(results.run_dir(cfg.results_dir, cfg.run_path) / "checkpoint.pt",
                      weights_only=True)
    info = dataset_info(cfg.dataset)
    model = create_model(cfg.arch, num_classes=info.num_classes, in_channels=info.channels,
                         mean=info.mean, std=info.std, **cfg.model_args)
    model.load_state_dict(ckpt["model"])  # strict: the same keys, no `_orig_mod.` prefix
    acc = clean_accuracy(model, test_x, test_y, batch=cfg.eval_batch, device=torch.device("cpu"))
    assert acc == pytest.approx(record["clean_acc"], abs=0.05)  # <= 5 of 10,000 images
