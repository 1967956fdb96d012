"""Test-only fault injection: SIGKILL this process at a named point, so that the tests can
prove a run killed anywhere resumes to the uninterrupted result (tests/test_failures.py).

    REPRO_FAULT="checkpoint-write:2"   die during the 2nd checkpoint write (half the file written)
    REPRO_FAULT="step:3,eval:1"        several points, comma-separated; `:N` defaults to 1

Points: `step` (after an optimiser step), `pretrain-step` (the same, in an AFT pre-training
run), `eval` (after the final evaluation, before its record), `checkpoint-write` and
`record-write` (mid-write, after part of the temporary file is on disk). Nothing else reads
REPRO_FAULT; with it unset, `point()` returns at once. Never set it outside the tests.
"""
from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}  # how often this process reached each point


def point(name: str) -> None:
    """SIGKILL this process if REPRO_FAULT asks to die the N-th time `name` is reached."""
    spec = os.environ.get("REPRO_FAULT")
    if not spec:
        return
    _reached[name] = _reached.get(name, 0) + 1
    for item in spec.split(","):
        where, _, nth = item.strip().partition(":")
        if where == name and _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
