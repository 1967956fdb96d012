"""The results store: one folder per run, atomic writes, and `load()` into one DataFrame.

Layout (DESIGN §8):
  results/runs/<scale>/<experiment>/<row>/seed<k>/
      config.json    the fully resolved config with its hash
      metrics.csv    one line per epoch
      record.json    status, final metrics, times, FLOPs, hardware, code version
      checkpoint.pt  the last epoch's state (never in git)
  results/runs/<scale>/pretrain/<config-hash>/   natural pre-training runs, reused by hash

Every file is written to a temporary name in the same folder, fsynced, then renamed, so a
reader (or a crash) sees either the old file or the new one, never half of one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .errors import ReproError

STATUS_DONE = "done"
STATUS_RUNNING = "running"
STATUS_FAILED = "failed"


def runs_root(results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs"


def run_dir(results_dir: str | Path, run_path: str) -> Path:
    return runs_root(results_dir) / run_path


def pretrain_path(scale: str, config_hash: str) -> str:
    return f"{scale}/pretrain/{config_hash}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write_bytes(Path(path), buffer.getvalue())


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
    except FileNotFoundError:
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
