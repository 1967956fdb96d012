"""The store as one pandas DataFrame (`load`): what tables and figures read. The only module of
the store that imports pandas, so that training never does."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .layout import (STATUS_UNREADABLE, UnreadableRunError, _identity_from_path, _iter_run_dirs,
                     read_run, run_path_of, runs_root)


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
