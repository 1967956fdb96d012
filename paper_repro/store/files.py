"""Crash-safe file I/O of the store: every file is written to a temporary name in the same
folder, fsynced, then renamed, so a reader (or a crash) sees either the old file or the new
one, never half of one. Checkpoints keep the one they replace (checkpoint.prev.pt), are checked
against torch's per-record CRCs (which `torch.load` itself never checks), and are read only
with `torch.load(weights_only=True)` (`safe_load`: the suite's one `torch.load`)."""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .. import faults
from ..errors import CheckpointError

TEMP_SUFFIX = ".tmp"


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


def previous_checkpoint(path: Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt: the last good checkpoint before the newest one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save a checkpoint atomically, keeping the one it replaces as checkpoint.prev.pt.

    checkpoint.pt exists at every moment once written: the old one gets its second name by a
    hard link before the new one is renamed over it, so a run stopped mid-save (the pool's
    Ctrl-C, a SLURM time limit) always leaves a checkpoint.pt to resume from. A file torn
    anyway (a file system that lies about fsync, a copy cut short) is caught by
    `check_checkpoint` and the previous one is used.
    """
    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = _write_temp(path, buffer.getvalue(), fault="checkpoint-write")
    try:
        if path.exists():
            _keep_as_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _keep_as_previous(path: Path) -> None:
    """Give the current checkpoint the name checkpoint.prev.pt too, without removing either
    name at any moment: a hard link under a temporary name, renamed over the old previous one.
    A file system without hard links falls back to a rename (checkpoint.pt is briefly absent;
    `load_checkpoint` then resumes from checkpoint.prev.pt)."""
    previous = previous_checkpoint(path)
    link = path.with_name(f".{path.name}.prev-link{TEMP_SUFFIX}")  # remove_stale_temps's pattern
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    os.replace(link, previous)


def check_checkpoint(path: Path) -> str | None:
    """Why the checkpoint file is torn (None if it is whole): torch.save writes a zip archive
    with a CRC-32 per record, which torch.load never checks; zipfile does."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"not a whole checkpoint archive ({' '.join(str(e).split())})"
    return f"record {bad} fails its CRC check" if bad else None


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


def load_error(path: Path | str, e: Exception) -> CheckpointError:
    """The one-line error for a file torch.load(weights_only=True) would not read."""
    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        return CheckpointError(f"{path}: refused, it is a full pickle rather than a state dict "
                               f"(loading it could run code): {reason}")
    return CheckpointError(f"{path}: unreadable or truncated checkpoint ({reason})")


def safe_load(path: Path | str) -> Any:
    """torch.load with weights_only=True: a pickled object that would run code is refused."""
    import torch

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... alike
        raise load_error(path, e) from None
