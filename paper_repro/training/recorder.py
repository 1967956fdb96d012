"""Everything a run writes into its folder, written by rank 0 alone: the lock, config.json,
the running/failed/done record, the checkpoint, best.pt (validation split only), the per-epoch
metrics (metrics.csv, lr.csv, and TensorBoard scalars under tensorboard/ when the optional
package is installed). The other ranks of a data-parallel run get a recorder that writes
nothing, so the training loop has no rank branches.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..store import files, layout
from ..store.locks import run_lock
from ..store.checkpoints import TrainingState, reconcile_best
from ..config import RunConfig
from ..errors import ReproError
from .monitoring import VAL_SCORE, epoch_line


TENSORBOARD_DIR = "tensorboard"
_said_no_tensorboard: list[bool] = []  # "tensorboard is not installed" is said once per process


class TensorBoardScalars:
    """A run's curves as TensorBoard scalars, so `tensorboard --logdir results/runs` shows every
    run of a sweep, local or on SLURM, while it trains: each epoch's numeric metrics (step =
    epoch) and the LR of every optimiser step (step = optimiser step). Rebuilt from the metrics
    on every start, so a resumed run's events equal an uninterrupted run's. Derived from
    metrics.csv and lr.csv, which stay the record; the folder is not kept in git."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        shutil.rmtree(directory, ignore_errors=True)
        self.writer = SummaryWriter(str(directory))
        self.steps_written = 0

    @classmethod
    def open(cls, directory: Path) -> TensorBoardScalars | None:
        try:
            return cls(directory)
        except ImportError:
            if not _said_no_tensorboard:
                _said_no_tensorboard.append(True)
                print("note: tensorboard is not installed, so runs write no TensorBoard "
                      "scalars (pip install -e .[tensorboard]); metrics.csv has the same "
                      "numbers", file=sys.stderr)
            return None

    def add(self, rows: list[dict[str, Any]], lr_log: list[float]) -> None:
        for row in rows:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) \
                        and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        for step in range(self.steps_written, len(lr_log)):
            self.writer.add_scalar("step/lr", lr_log[step], step)
        self.steps_written = len(lr_log)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Recorder:
    """The writing recorder (rank 0)."""

    writes = True

    def __init__(self, cfg: RunConfig, directory: Path, run_path: str,
                 base_record: dict[str, Any], quiet: bool) -> None:
        self.cfg, self.directory, self.run_path = cfg, directory, run_path
        self.base_record, self.quiet = base_record, quiet
        self.scalars: TensorBoardScalars | None = None

    def open(self, locks: contextlib.ExitStack) -> dict[str, Any] | None:
        """Create the run's folder and lock it for as long as `locks` is open (the kernel
        releases the lock even on SIGKILL); returns the record as it is now."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReproError(f"cannot create {self.directory}: {e.strerror}") from None
        if not locks.enter_context(run_lock(self.directory)):
            # unguarded (run_lock warned): every record of this start says so; the runner's
            # final record is built on this same base record
            self.base_record["locked"] = False
        return layout.read_record(self.directory)

    def start(self) -> None:
        """Under the lock: stale temporary files of this run's own writes go, config.json comes."""
        layout.remove_stale_temps(self.directory)
        files.atomic_write_json(self.directory / "config.json",
                                  {**self.cfg.to_dict(), "config_hash": self.cfg.config_hash()})

    def running(self, state: TrainingState) -> None:
        reconcile_best(self.directory, state)  # best.pt: the best epoch the checkpoint names
        layout.write_record(self.directory, {**self.base_record,
                                              "status": layout.STATUS_RUNNING,
                                              "epochs_done": state.epoch})
        self.scalars = TensorBoardScalars.open(self.directory / TENSORBOARD_DIR)
        if self.scalars is not None:  # a resumed run: its epochs so far, again
            self.scalars.add(state.metrics, state.lr_log)

    def end_epoch(self, state: TrainingState, row: Callable[[], dict[str, Any]],
                  save_checkpoint: Callable[[], None], save_best: Callable[[], None]) -> None:
        """Measure the epoch's row of metrics (`row` monitors: rank 0's work alone), then
        best.pt if the epoch has the best validation score so far, then the checkpoint (which
        names the best epoch), then metrics.csv and lr.csv, in that order (a kill between
        leaves a checkpoint the rest is rebuilt from)."""
        metrics = row()
        state.metrics.append(metrics)
        if VAL_SCORE in metrics and state.improves(metrics["epoch"], metrics[VAL_SCORE]):
            save_best()
        save_checkpoint()
        files.write_metrics(self.directory / "metrics.csv", state.metrics)
        files.write_metrics(self.directory / "lr.csv",
                              [{"step": i, "lr": lr} for i, lr in enumerate(state.lr_log)])
        if self.scalars is not None:
            self.scalars.add(state.metrics[-1:], state.lr_log)
        if not self.quiet:
            tqdm.write(epoch_line(self.run_path, state.metrics[-1], self.cfg.epochs))

    def fail(self, epoch: int, reason: str) -> None:
        self._close_scalars()
        layout.write_record(self.directory, {**self.base_record, "status": layout.STATUS_FAILED,
                                              "failed_epoch": epoch + 1, "reason": reason})

    def done(self, record: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Evaluate and write the final record: the last write, so "done" means all is on disk."""
        self._close_scalars()
        return layout.write_record(self.directory, record())

    def _close_scalars(self) -> None:
        if self.scalars is not None:
            self.scalars.close()
            self.scalars = None


class SilentRecorder(Recorder):
    """A data-parallel rank other than 0: it trains its slice and writes nothing."""

    writes = False

    def open(self, locks: contextlib.ExitStack) -> dict[str, Any] | None:
        return None

    def start(self) -> None:
        pass

    def running(self, state: TrainingState) -> None:
        pass

    def end_epoch(self, state: TrainingState, row: Callable[[], dict[str, Any]],
                  save_checkpoint: Callable[[], None], save_best: Callable[[], None]) -> None:
        pass

    def fail(self, epoch: int, reason: str) -> None:
        pass

    def done(self, record: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return {}
