"""FLOPs counted from the real code path with torch.utils.flop_counter.

`FlopCounterMode` attributes FLOPs to modules through a `ModuleTracker`, whose backward hooks
raise inside `torch.autograd.grad` ("A leaf node was passed to _will_engine_execute_node"),
which every attack uses. `TotalFlopCounter` keeps PyTorch's per-op FLOP formulas and counting
mode and drops only the module attribution: totals are all the tables need.
"""
from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode


class TotalFlopCounter(FlopCounterMode):
    """Counts total FLOPs (forward, backward, attack passes alike) inside a `with` block."""

    def __init__(self) -> None:
        super().__init__(display=False)

    def __enter__(self) -> "TotalFlopCounter":
        self.flop_counts.clear()
        getattr(self, "_unsupported_ops", {}).clear()  # kept by some torch versions only
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: object) -> None:
        self.mode.__exit__(*args)
        self.mode = None
