"""The results store: one folder per run, atomic writes, and `load()` into one DataFrame.

Layout (DESIGN §8):
  results/runs/<scale>/<experiment>/<row>/seed<k>/
      config.json    the fully resolved config with its hash
      metrics.csv    one line per epoch
      record.json    status, final metrics, times, FLOPs, hardware, code version
      checkpoint.pt  the last epoch's state (never in git), checkpoint.prev.pt the one before
  results/runs/<scale>/pretrain/<config-hash>/   natural pre-training runs, reused by hash

Every file is written to a temporary name in the same folder, fsynced, then renamed, so a
reader (or a crash) sees either the old file or the new one, never half of one. A process
training a run holds a lock on its folder (`run_lock`), so two never train the same run.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from . import faults
from .errors import ReproError

STATUS_DONE = "done"
STATUS_RUNNING = "running"
STATUS_FAILED = "failed"
TEMP_SUFFIX = ".tmp"


def runs_root(results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs"


def run_dir(results_dir: str | Path, run_path: str) -> Path:
    return runs_root(results_dir) / run_path


def pretrain_path(scale: str, config_hash: str) -> str:
    return f"{scale}/pretrain/{config_hash}"


def _write_temp(path: Path, data: bytes, fault: str | None = None) -> Path:
    """`data` in a fsynced temporary file next to `path` (same file system: rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2 if fault else len(data)
            f.write(data[:half])
            if fault:  # test-only: the tests may die here, half the file written (faults.py)
                f.flush()
                faults.point(fault)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    tmp = _write_temp(path, data, fault)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_record(directory: Path, record: dict[str, Any]) -> None:
    """record.json, atomically: a reader or a crash sees the old record or the new one."""
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write_bytes(Path(directory) / "record.json", text.encode(), fault="record-write")


def previous_checkpoint(path: Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt: the last good checkpoint before the newest one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save a checkpoint atomically, keeping the one it replaces as checkpoint.prev.pt.

    A crash at any moment leaves checkpoint.pt, checkpoint.prev.pt or both intact; a file
    torn anyway (a file system that lies about fsync, a copy cut short) is caught by
    `check_checkpoint` and the previous one is used.
    """
    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = _write_temp(path, buffer.getvalue(), fault="checkpoint-write")
    try:
        if path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_checkpoint(path: Path) -> str | None:
    """Why the checkpoint file is torn (None if it is whole): torch.save writes a zip archive
    with a CRC-32 per record, which torch.load never checks; zipfile does."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"not a whole checkpoint archive ({' '.join(str(e).split())})"
    return f"record {bad} fails its CRC check" if bad else None


RUN_FILES = ("checkpoint.pt", "config.json", "record.json", "metrics.csv", "lr.csv")


def remove_stale_temps(directory: Path) -> None:
    """Temporary files of the run's own writes that a killed trainer never finished (call
    under run_lock; other writers' files, such as the SLURM ledger, are left alone)."""
    for name in RUN_FILES:
        for tmp in Path(directory).glob(f".{name}.*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while training it; a second process training
    the same run is refused. The kernel releases it when the holder dies, even by SIGKILL."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReproError(f"{directory} is being trained by another process; wait for it "
                             "or stop it (`status` shows the run as running)") from None
        except OSError:
            pass  # a file system without locks (some NFS mounts): train unguarded
        yield
    finally:
        os.close(fd)


def is_locked(directory: Path) -> bool:
    """True while some process holds `run_lock` on the folder (that run is training now)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv whole (atomically): it is small, and a torn append is impossible."""
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError as e:
        raise ReproError(f"{path}: unreadable JSON ({e})") from None


def read_record(directory: Path) -> dict[str, Any] | None:
    return read_json(Path(directory) / "record.json")


def is_done(directory: Path) -> bool:
    record = read_record(directory)
    return bool(record) and record.get("status") == STATUS_DONE


def _iter_run_dirs(root: Path) -> Iterable[Path]:
    for record in sorted(root.glob("**/record.json")):
        yield record.parent


def load(results_dir: str | Path = "results", *, scale: str | None = None,
         include_pretrain: bool = False) -> pd.DataFrame:
    """Every run in the store as one DataFrame: config fields, then record fields.

    Tables and figures read only this. Per-epoch curves are in each run's metrics.csv
    (column `metrics_path`).
    """
    root = runs_root(results_dir)
    rows = []
    for d in _iter_run_dirs(root):
        record = read_record(d) or {}
        config = read_json(d / "config.json") or {}
        if not include_pretrain and config.get("experiment") == "pretrain":
            continue
        if scale is not None and config.get("scale") != scale:
            continue
        row = {f"cfg_{k}": v for k, v in config.items() if not isinstance(v, dict)}
        row.update({k: v for k, v in record.items() if not isinstance(v, (dict, list))})
        row.update(experiment=config.get("experiment"), row=config.get("row"),
                   scale=config.get("scale"), seed=config.get("seed"),
                   method=config.get("method"), arch=config.get("arch"),
                   dataset=config.get("dataset"), config_hash=config.get("config_hash"),
                   run_dir=str(d), metrics_path=str(d / "metrics.csv"))
        rows.append(row)
    return pd.DataFrame(rows)


def load_metrics(run_directory: str | Path) -> pd.DataFrame:
    path = Path(run_directory) / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()
