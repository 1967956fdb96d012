"""Everything a run writes into its folder, written by rank 0 alone: the lock, config.json,
the running/failed/done record, the checkpoint and the per-epoch metrics. The other ranks of a
data-parallel run get a recorder that writes nothing, so the training loop has no rank branches.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from . import results
from .checkpoints import TrainingState
from .config import RunConfig
from .errors import ReproError
from .monitoring import epoch_line


class Recorder:
    """The writing recorder (rank 0)."""

    writes = True

    def __init__(self, cfg: RunConfig, directory: Path, run_path: str,
                 base_record: dict[str, Any], quiet: bool) -> None:
        self.cfg, self.directory, self.run_path = cfg, directory, run_path
        self.base_record, self.quiet = base_record, quiet

    def open(self, locks: contextlib.ExitStack) -> dict[str, Any] | None:
        """Create the run's folder and lock it for as long as `locks` is open (the kernel
        releases the lock even on SIGKILL); returns the record as it is now."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReproError(f"cannot create {self.directory}: {e.strerror}") from None
        locks.enter_context(results.run_lock(self.directory))
        return results.read_record(self.directory)

    def start(self) -> None:
        """Under the lock: stale temporary files of this run's own writes go, config.json comes."""
        results.remove_stale_temps(self.directory)
        results.atomic_write_json(self.directory / "config.json",
                                  {**self.cfg.to_dict(), "config_hash": self.cfg.config_hash()})

    def running(self, epochs_done: int) -> None:
        results.write_record(self.directory, {**self.base_record,
                                              "status": results.STATUS_RUNNING,
                                              "epochs_done": epochs_done})

    def end_epoch(self, state: TrainingState, row: Callable[[], dict[str, Any]],
                  save_checkpoint: Callable[[], None]) -> None:
        """Measure the epoch's row of metrics (`row` monitors: rank 0's work alone), then the
        checkpoint, then metrics.csv and lr.csv, in that order (a kill between leaves a
        checkpoint the metrics are rebuilt from)."""
        state.metrics.append(row())
        save_checkpoint()
        results.write_metrics(self.directory / "metrics.csv", state.metrics)
        results.write_metrics(self.directory / "lr.csv",
                              [{"step": i, "lr": lr} for i, lr in enumerate(state.lr_log)])
        if not self.quiet:
            tqdm.write(epoch_line(self.run_path, state.metrics[-1], self.cfg.epochs))

    def fail(self, epoch: int, reason: str) -> None:
        results.write_record(self.directory, {**self.base_record, "status": results.STATUS_FAILED,
                                              "failed_epoch": epoch + 1, "reason": reason})

    def done(self, record: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Evaluate and write the final record: the last write, so "done" means all is on disk."""
        final = record()
        results.write_record(self.directory, final)
        return final


class SilentRecorder(Recorder):
    """A data-parallel rank other than 0: it trains its slice and writes nothing."""

    writes = False

    def open(self, locks: contextlib.ExitStack) -> dict[str, Any] | None:
        return None

    def start(self) -> None:
        pass

    def running(self, epochs_done: int) -> None:
        pass

    def end_epoch(self, state: TrainingState, row: Callable[[], dict[str, Any]],
                  save_checkpoint: Callable[[], None]) -> None:
        pass

    def fail(self, epoch: int, reason: str) -> None:
        pass

    def done(self, record: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return {}
