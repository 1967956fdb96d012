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

Every record carries `schema` (RECORD_SCHEMA); a record without it is schema 1 (written before
the field existed). Reading degrades gracefully: `load()` never stops at a run whose record or
config cannot be read (torn, not JSON, a newer schema than this code knows); it returns that run
as one line with status "unreadable" and the reason in `problem`, so that tables show the cell
as unreadable, every other cell still renders, and the CLI warns once per run. The runner still
refuses to train over such a run (`read_record` raises `UnreadableRunError`): nothing that cannot
be read is ever overwritten.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import os
import sys
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
STATUS_UNREADABLE = "unreadable"  # only in `load()`'s frame: never written to a record
TEMP_SUFFIX = ".tmp"
RECORD_SCHEMA = 1  # record.json's format; a record without `schema` is 1 (legacy, same format)
LEDGER = "slurm.json"  # per run: the job that trains it (SLURM or the local pool), for `status`


class UnreadableRunError(ReproError):
    """A run's record.json or config.json that cannot be read: torn, not a JSON object, or of a
    newer schema than this code. `path` is the file, `reason` what is wrong, `advice` the fix."""

    def __init__(self, path: Path, reason: str, advice: str) -> None:
        self.path, self.reason, self.advice = Path(path), reason, advice
        super().__init__(f"{path}: {reason}; {advice}")

    @property
    def run_path(self) -> str:
        """The run's id (<scale>/<experiment>/<row>/seed<k>), from where the file lies."""
        return run_path_of(self.path.parent)


def run_path_of(directory: Path) -> str:
    """A run folder's id: its path below the store's `runs/` folder (the whole path if none)."""
    parts = Path(directory).parts
    if "runs" not in parts:
        return str(directory)
    last = len(parts) - 1 - parts[::-1].index("runs")
    return "/".join(parts[last + 1:])


def runs_root(results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs"


def require_store(results_dir: str | Path) -> Path:
    """A store that a command only reads must exist: a typo in --results-dir is one line, never
    a new empty store and an all-"not run" table."""
    path = Path(results_dir)
    if not path.is_dir():
        raise ReproError(f"no results store at {path}: check --results-dir (this command only "
                         "reads a store; `sweep` or `run` create one)")
    return path


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


def write_record(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """record.json, atomically: a reader or a crash sees the old record or the new one.
    Stamped with this code's RECORD_SCHEMA, so that a reader can tell a format it does not know.
    Returns the record as written (what a later read of the store gives)."""
    record = {**record, "schema": RECORD_SCHEMA}
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write_bytes(Path(directory) / "record.json", text.encode(), fault="record-write")
    return record


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


RUN_FILES = ("checkpoint.pt", "best.pt", "config.json", "record.json", "metrics.csv", "lr.csv")


def remove_stale_temps(directory: Path) -> None:
    """Temporary files of the run's own writes that a killed trainer never finished (call
    under run_lock; other writers' files, such as the SLURM ledger, are left alone)."""
    for name in RUN_FILES:
        for tmp in Path(directory).glob(f".{name}.*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[bool]:
    """Hold an exclusive lock on a run folder while training it; a second process training
    the same run is refused. The kernel releases it when the holder dies, even by SIGKILL.

    Yields whether the folder is locked: on a file system that cannot take a lock (some NFS
    mounts, where SLURM jobs share a store) the run trains unguarded, said in one warning line
    on stderr, and False lets the recorder put `locked: false` in the record."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ReproError(f"{directory} is being trained by another process; wait for it "
                             "or stop it (`status` shows the run as running)") from None
        except OSError as e:
            locked = False
            print(f"warning: cannot lock {directory} ({e.strerror or e}): the file system "
                  "takes no locks, so nothing stops a second process training this run "
                  "(its record says locked: false)", file=sys.stderr, flush=True)
        yield locked
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


_REPAIR = ("restore the file (e.g. `git checkout -- FILE` for a committed run) or remove the "
           "run's folder and run it again")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file of the store; None if the file does not exist.
    A file that is not a whole JSON object raises UnreadableRunError (one line)."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableRunError(path, f"unreadable JSON ({' '.join(str(e).split())})",
                                 _REPAIR.replace("FILE", str(path))) from None
    except OSError as e:
        raise UnreadableRunError(path, f"cannot be read ({e.strerror})",
                                 "check its permissions") from None
    if not isinstance(obj, dict):
        raise UnreadableRunError(path, f"holds a JSON {type(obj).__name__}, not an object",
                                 _REPAIR.replace("FILE", str(path)))
    return obj


def read_record(directory: Path) -> dict[str, Any] | None:
    """The run's record (None before its first write). A record of a newer schema than this
    code knows is refused like a torn one: reading it as this schema could misreport it."""
    path = Path(directory) / "record.json"
    record = read_json(path)
    if record is None:
        return None
    schema = record.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise UnreadableRunError(path, f"has an invalid schema {schema!r}",
                                 _REPAIR.replace("FILE", str(path)))
    if schema > RECORD_SCHEMA:
        raise UnreadableRunError(path, f"has schema {schema}, newer than this code reads "
                                 f"({RECORD_SCHEMA})", "update the code (git pull) to read it")
    return record


def is_done(directory: Path) -> bool:
    record = read_record(directory)
    return bool(record) and record.get("status") == STATUS_DONE


def _iter_run_dirs(root: Path) -> Iterable[Path]:
    for record in sorted(root.glob("**/record.json")):
        yield record.parent


def read_run(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, record) of a run folder that has a record; UnreadableRunError if either cannot
    be read, including a config that is missing (the runner writes it before any record)."""
    record = read_record(directory) or {}
    config = read_json(directory / "config.json")
    if config is None:
        raise UnreadableRunError(directory / "config.json", "is missing (the run has a record)",
                                 _REPAIR.replace("FILE", str(directory / "config.json")))
    return config, record


def _identity_from_path(directory: Path) -> dict[str, Any]:
    """What the folder's place in the store says about a run whose config cannot be read:
    <scale>/<experiment>/<row>/seed<k>, or <scale>/pretrain/<hash>."""
    parts = run_path_of(directory).split("/")
    seed = parts[3][4:] if len(parts) > 3 and parts[3].startswith("seed") else ""
    return {"scale": parts[0] if parts else None,
            "experiment": parts[1] if len(parts) > 1 else None,
            "row": parts[2] if len(parts) > 2 else None,
            "seed": int(seed) if seed.isdigit() else None}


def load(results_dir: str | Path = "results", *, scale: str | None = None,
         include_pretrain: bool = False) -> pd.DataFrame:
    """Every run in the store as one DataFrame: config fields, then record fields.

    Tables and figures read only this. Per-epoch curves are in each run's metrics.csv
    (column `metrics_path`). A run whose record or config cannot be read is one line with
    status "unreadable", `problem` (the file, what is wrong, what to do) and the identity its
    folder gives; it never stops the others (`problems()` lists them).
    """
    root = runs_root(results_dir)
    rows = []
    for d in _iter_run_dirs(root):
        try:
            config, record = read_run(d)
        except UnreadableRunError as e:
            ident = _identity_from_path(d)
            if (not include_pretrain and ident["experiment"] == "pretrain") or \
                    (scale is not None and ident["scale"] != scale):
                continue
            rows.append({**ident, "status": STATUS_UNREADABLE, "problem": str(e),
                         "run_path": run_path_of(d), "run_dir": str(d),
                         "metrics_path": str(d / "metrics.csv")})
            continue
        if not include_pretrain and config.get("experiment") == "pretrain":
            continue
        if scale is not None and config.get("scale") != scale:
            continue
        row = {f"cfg_{k}": v for k, v in config.items() if not isinstance(v, dict)}
        row.update({k: v for k, v in record.items() if not isinstance(v, (dict, list))})
        row.update(experiment=config.get("experiment"), row=config.get("row"),
                   scale=config.get("scale"), seed=config.get("seed"),
                   method=config.get("method"), arch=config.get("arch"),
                   arch_label=arch_label(config.get("arch"), config.get("model_args")),
                   dataset=config.get("dataset"), config_hash=config.get("config_hash"),
                   run_dir=str(d), metrics_path=str(d / "metrics.csv"))
        rows.append(row)
    return pd.DataFrame(rows)


def arch_label(arch: str | None, model_args: dict | None) -> str | None:
    """The network as a table names it: the registry name and its arguments, so that two
    stand-ins of one family (e.g. MLPs of two widths) never look the same."""
    if not model_args:
        return arch
    return f"{arch} ({', '.join(f'{k}={v}' for k, v in sorted(model_args.items()))})"


def problems(frame: pd.DataFrame) -> list[str]:
    """The `problem` of every unreadable run in a `load()` frame, in store order."""
    if frame.empty or "problem" not in frame:
        return []
    return list(frame.loc[frame["status"] == STATUS_UNREADABLE, "problem"])


def load_metrics(run_directory: str | Path) -> pd.DataFrame:
    path = Path(run_directory) / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()
