"""Where the store keeps a run, and reading and writing its record.

Layout (DESIGN §8):
  results/runs/<scale>/<experiment>/<row>/seed<k>/
      config.json    the fully resolved config with its hash
      metrics.csv    one line per epoch
      record.json    status, final metrics, times, FLOPs, hardware, code version
      checkpoint.pt  the last epoch's state (never in git), checkpoint.prev.pt the one before
  results/runs/<scale>/pretrain/<config-hash>/   natural pre-training runs, reused by hash

Every record carries `schema` (RECORD_SCHEMA); a record without it is schema 1 (written before
the field existed). Reading degrades gracefully: `query.load()` never stops at a run whose
record or config cannot be read (torn, not JSON, a newer schema than this code knows); it
returns that run as one line with status "unreadable" and the reason in `problem`, so that
tables show the cell as unreadable, every other cell still renders, and the CLI warns once per
run. The runner still refuses to train over such a run (`read_record` raises
`UnreadableRunError`): nothing that cannot be read is ever overwritten.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import ReproError
from .files import TEMP_SUFFIX, _atomic_write_bytes

STATUS_DONE = "done"
STATUS_RUNNING = "running"
STATUS_FAILED = "failed"
STATUS_UNREADABLE = "unreadable"  # only in `load()`'s frame: never written to a record
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


def write_record(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """record.json, atomically: a reader or a crash sees the old record or the new one.
    Stamped with this code's RECORD_SCHEMA, so that a reader can tell a format it does not know.
    Returns the record as written (what a later read of the store gives)."""
    record = {**record, "schema": RECORD_SCHEMA}
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write_bytes(Path(directory) / "record.json", text.encode(), fault="record-write")
    return record


RUN_FILES = ("checkpoint.pt", "best.pt", "config.json", "record.json", "metrics.csv", "lr.csv")


def remove_stale_temps(directory: Path) -> None:
    """Temporary files of the run's own writes that a killed trainer never finished (call
    under run_lock; other writers' files, such as the SLURM ledger, are left alone)."""
    for name in RUN_FILES:
        for tmp in Path(directory).glob(f".{name}.*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


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
