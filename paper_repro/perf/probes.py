"""Did an attack pass compute weight gradients? The probes `bench` and the fast-path tests use.

An attack needs the gradient with respect to its input only; computing the weights' gradient
too is the largest waste a PGD-k step can have (performance.md §3). Eager code is watched by a
dispatch mode (`WeightGradProbe`) that flags any op computing a parameter gradient; compiled
code is invisible to it, so the compile backend itself is wrapped (`CompiledGraphProbe`) and
each backward graph an attack pass runs is inspected for parameter gradients it returns.
`probing_attacks` patches every attack-only pass (`attacks._input_gradient`, YOPO's
`layer_one_steps`) to run under both, and checks every parameter's `.grad` before and after.
"""
from __future__ import annotations

import contextlib
from collections import Counter
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError
from ..robustness.attacks import ATTACK_PASSES
from ..training.methods import list_methods

_MATMULS = ("mm", "addmm", "bmm", "baddbmm")
# autograd nodes that only cast, view or transpose: a parameter behind them is a direct input
_LAYOUT_NODES = ("TBackward0", "ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0",
                 "TransposeBackward0", "PermuteBackward0", "ExpandBackward0",
                 "ReshapeAliasBackward0")


class WeightGradProbe(TorchDispatchMode):
    """Counts the ops that compute a parameter gradient while it is active.

    A backward op with an `output_mask` (convolution, batch norm) computes a weight/bias
    gradient when mask[1:] asks for it. A matmul run by a backward node (a Linear's
    AddmmBackward) computes one when that node passes a gradient on to a parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.param_ids = {id(p) for p in model.parameters()}
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        mask = _output_mask(func, args, kwargs)
        if mask is not None:
            if any(mask[1:]):
                self.ops[name] += 1
        elif name in _MATMULS:
            node = torch._C._current_autograd_node()
            if node is not None and any(fn is not None and self._reaches_parameter(fn)
                                        for fn, _ in node.next_functions):
                self.ops[name] += 1
        return func(*args, **kwargs)

    def _reaches_parameter(self, fn: Any, depth: int = 4) -> bool:
        if hasattr(fn, "variable"):  # AccumulateGrad of a leaf
            return id(fn.variable) in self.param_ids
        if depth == 0 or fn.name() not in _LAYOUT_NODES:
            return False
        return any(f is not None and self._reaches_parameter(f, depth - 1)
                   for f, _ in fn.next_functions)


def _output_mask(func, args: tuple, kwargs: dict) -> list[bool] | None:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "output_mask":
            return list(kwargs["output_mask"] if "output_mask" in kwargs else args[i])
    return None


@dataclasses.dataclass
class ProbeReport:
    attack_calls: int = 0
    wgrad_ops: Counter = dataclasses.field(default_factory=Counter)
    grads_touched: int = 0  # attack calls after which some parameter's .grad differed
    compiled_graphs: int = 0  # compiled graphs run inside attack passes (with `graphs`)
    compiled_wgrads: int = 0  # parameter gradients their backward graphs compute
    compiled_unverified: int = 0  # of those graphs, ones whose backward was never seen


@dataclasses.dataclass
class CompiledGraph:
    """One graph dynamo handed to the backend, and what its backward graph computes."""

    param_positions: tuple[int, ...]  # which graph inputs are the model's parameters
    num_inputs: int
    backward_seen: bool = False
    weight_gradients: int = 0  # parameter gradients the backward graph returns
    wgrad_ops: Counter = dataclasses.field(default_factory=Counter)
    calls_in_attack: int = 0


class CompiledGraphProbe:
    """A torch.compile backend ("inductor" or "aot_eager") that inspects every backward graph.

    Why: inside a compiled region the dispatch-mode probe sees nothing (inductor runs its own
    kernels), and a parameter's `.grad` stays untouched even when the compiled backward does
    compute its gradient: `autograd.grad(loss, x)` returns only what was asked, and the
    compiled backward computes a gradient for every graph input that required grad when it
    was traced (pytorch#132929). So the backward graph is the evidence: graph input i is a
    parameter, output i of the backward graph is its gradient (None when not computed).
    `probing_attacks(graphs=...)` marks the graphs that run inside attack-only passes.
    """

    def __init__(self, model: nn.Module, backend: str = "inductor") -> None:
        if backend not in ("inductor", "aot_eager"):
            raise ConfigError(f"compile backend must be inductor or aot_eager, got '{backend}'")
        self.param_ids = {id(p) for p in model.parameters()}
        self.backend = backend
        self.graphs: list[CompiledGraph] = []
        self.in_attack = False

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graph = CompiledGraph(tuple(i for i, t in enumerate(example_inputs)
                                    if id(t) in self.param_ids or isinstance(t, nn.Parameter)),
                              num_inputs=len(example_inputs))
        self.graphs.append(graph)

        def record(bw: torch.fx.GraphModule) -> None:
            (outputs,) = next(n for n in bw.graph.nodes if n.op == "output").args
            graph.backward_seen = True
            if len(outputs) == graph.num_inputs:  # one gradient slot per forward input
                graph.weight_gradients += sum(outputs[i] is not None
                                              for i in graph.param_positions)
            for node in bw.graph.nodes:
                if node.op == "call_function" and hasattr(node.target, "_schema"):
                    mask = _output_mask(node.target, node.args, node.kwargs)
                    if mask is not None and any(mask[1:]):
                        graph.wgrad_ops[node.target.overloadpacket.__name__] += 1

        import torch._functorch.config as functorch_config

        # a cached graph would skip the backward compiler, and with it the inspection
        with functorch_config.patch(enable_autograd_cache=False):
            compiled = self._compile(gm, example_inputs, record)

        def run(*args: Any) -> Any:
            if self.in_attack:
                graph.calls_in_attack += 1
            return compiled(*args)
        return run

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list,
                 record: Callable[[torch.fx.GraphModule], None]) -> Callable:
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx, compile_fx_inner

            def inner(g: torch.fx.GraphModule, inputs: list, **kwargs: Any) -> Any:
                if kwargs.get("is_backward"):
                    record(g)
                return compile_fx_inner(g, inputs, **kwargs)
            return compile_fx(gm, example_inputs, inner_compile=inner)
        from torch._dynamo.backends.debugging import aot_eager, boxed_nop

        def backward(g: torch.fx.GraphModule, inputs: list) -> Callable:
            record(g)
            return boxed_nop(g, inputs)
        return aot_eager(gm, example_inputs, bw_compiler=backward)


@contextlib.contextmanager
def probing_attacks(model: nn.Module, *, dispatch: bool = True,
                    graphs: CompiledGraphProbe | None = None) -> Iterator[ProbeReport]:
    """Watch every attack-only pass inside the block: ops (`WeightGradProbe`, eager code only),
    parameter `.grad`s, and, with `graphs` (the model's compile backend), the compiled graphs
    those passes run and the parameter gradients their backward graphs compute."""
    import importlib

    report = ProbeReport()
    params = list(model.parameters())
    calls_before = [g.calls_in_attack for g in graphs.graphs] if graphs else []

    def watch(fn: Callable) -> Callable:
        def watched(*args: Any, **kwargs: Any) -> Any:
            before = [None if p.grad is None else p.grad.clone() for p in params]
            probe = WeightGradProbe(model) if dispatch else contextlib.nullcontext()
            outer = graphs is not None and graphs.in_attack
            if graphs is not None:
                graphs.in_attack = True
            try:
                with probe:
                    out = fn(*args, **kwargs)
            finally:
                if graphs is not None:
                    graphs.in_attack = outer
            report.attack_calls += 1
            if dispatch:
                report.wgrad_ops.update(probe.ops)
            if any(_grad_changed(b, p.grad) for b, p in zip(before, params)):
                report.grads_touched += 1
            return out
        return watched

    originals = []
    list_methods()  # every plug-in imported: their attack passes are marked (@attack_pass)
    for module_name, attr in list(ATTACK_PASSES):
        module = importlib.import_module(module_name)
        originals.append((module, attr, getattr(module, attr)))
        setattr(module, attr, watch(getattr(module, attr)))
    try:
        yield report
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)
    if graphs is not None:
        calls_before += [0] * (len(graphs.graphs) - len(calls_before))
        used = [g for g, n in zip(graphs.graphs, calls_before) if g.calls_in_attack > n]
        report.compiled_graphs = len(used)
        report.compiled_wgrads = sum(g.weight_gradients + sum(g.wgrad_ops.values())
                                     for g in used)
        report.compiled_unverified = sum(not g.backward_seen for g in used)


def _grad_changed(before: torch.Tensor | None, after: torch.Tensor | None) -> bool:
    if before is None or after is None:
        return (before is None) != (after is None)
    return not torch.equal(before, after)
