"""A check made of pieces run against one wall-clock budget (`gpucheck` on a lent GPU, whose
device time is scarce): a piece starts only if its minimum time fits; a piece still running at
the deadline is interrupted (SIGALRM: Python code, a compilation included, stops at its next
bytecode; a CUDA call returns first); a piece that raises is recorded with its traceback and
the others still run. Whatever did not run is listed as skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
import traceback
from typing import Any, Callable, Iterator

import torch


class BudgetExceeded(Exception):
    """The check's wall-clock budget ran out while a piece was running."""


class Budget:
    """The check's wall-clock budget: pieces start only if their minimum fits, and a piece
    still running at the deadline is interrupted by SIGALRM (main thread only)."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + max(seconds, 0.0)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @contextlib.contextmanager
    def hard_stop(self) -> Iterator[None]:
        """Raise BudgetExceeded inside the block when the deadline passes."""
        left = self.remaining()
        if left <= 0:
            raise BudgetExceeded

        def expire(_signum: int, _frame: Any) -> None:
            raise BudgetExceeded

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class PieceLog:
    """What happened to the pieces: skipped (did not fit, or cut off), failed (with tracebacks)."""

    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    # piece -> its traceback: a GPU lease is scarce, the JSON must say where a piece broke
    tracebacks: dict[str, str] = dataclasses.field(default_factory=dict)
    out_of_time: bool = False


def run_piece(name: str, min_s: float, budget: Budget, report: PieceLog,
               fn: Callable[[], None]) -> None:
    """Run one piece inside the budget; record it as skipped or failed instead of raising."""
    if report.out_of_time or budget.remaining() < max(min_s, 1e-9):
        report.skipped.append(name)
        return
    try:
        with budget.hard_stop():
            fn()
    except BudgetExceeded:
        report.out_of_time = True
        report.skipped.append(f"{name} (cut off at the deadline)")
    except torch.OutOfMemoryError:
        report.failed.append(f"{name}: out of device memory")
        report.tracebacks[name] = traceback.format_exc()
        torch.cuda.empty_cache()
    except Exception as e:  # one broken piece must not lose the others' measurements
        report.failed.append(f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        report.tracebacks[name] = traceback.format_exc()
