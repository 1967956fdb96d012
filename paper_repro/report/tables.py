"""Experiment tables: our numbers (mean ± std over seeds) beside the paper's, from the store.

Each table is written as Markdown, CSV and LaTeX to results/tables/<scale>/<name>.*.
Cells are computed from `query.load()` and the paper's numbers from results/paper/*.csv;
a row that has no finished run shows empty measured cells and "not run"; a row with a run
whose record or config cannot be read shows empty measured cells and "unreadable" (never a
mean over the seeds that could be read), and every other row renders as it would without it.
Cells show each run's final model, or with `select="best"` its best epoch's (runs with a
validation split; written as <name>-best.*); a view row of the experiment file shows another
row's runs at its own select (e.g. PGD AT early-stopped), training nothing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..store import files, layout, query
from ..experiment import SELECTS, controlled_name, load_experiment, unsupported_reason
from ..errors import ReproError
from ..robustness.evaluation import (AA_ATTACKS, AA_PACKAGE, LARGE_EPS_FACTOR, LARGE_EPS_MAX_ACC,
                          ORDER_TOLERANCE_PP, PGD100_MARGIN_PP)

REPO_PAPER_DIR = Path(__file__).resolve().parents[2] / "results" / "paper"
COLUMNS = ["row", "method", "arch", "dataset", "scale", "n_seeds", "clean_acc", "clean_std",
           "pgd_acc", "pgd_std", "aa_acc", "aa_std", "val_pgd_acc", "train_minutes",
           "pretrain_minutes", "cost_pflop", "pretrain_pflop", "eval_n", "aa_n", "checks",
           "status", "paper_arch", "paper_clean", "paper_pgd", "paper_time", "paper_time_unit",
           "paper_minutes", "paper_source"]
MEASURED = ["clean_acc", "pgd_acc", "aa_acc", "val_pgd_acc", "train_minutes",
            "pretrain_minutes", "cost_pflop", "pretrain_pflop"]
UNCHECKED = "unchecked"  # a run evaluated before the checks existed
BEST_SHOWN = ("clean_acc", "pgd_acc", "aa_acc", "val_pgd_acc", "checks")  # best_<key> at best
# What the Checks column means, with the thresholds (evaluation.py)
CHECKS_NOTE = ("Checks (on the PGD images): clean ≥ FGSM ≥ PGD-20 ≥ AA (each with "
               f"{ORDER_TOLERANCE_PP} pp slack), PGD-100 at most {PGD100_MARGIN_PP} pp below "
               f"PGD-20, accuracy ≤ {LARGE_EPS_MAX_ACC:g}% under PGD-20 at {LARGE_EPS_FACTOR:g}ε, "
               "no AutoAttack warning; † marks a row that failed one (named in Checks), "
               "\"unchecked\" one evaluated before the checks existed. ")


def _paper_numbers(exp_paper_csv: str | None, results_dir: str | Path) -> pd.DataFrame:
    if not exp_paper_csv:
        return pd.DataFrame(columns=["row"])
    path = Path(results_dir) / "paper" / exp_paper_csv
    if not path.is_file():  # a scratch store (tests, sweeps elsewhere) uses the repo's copy
        path = REPO_PAPER_DIR / exp_paper_csv
    if not path.is_file():
        raise ReproError(f"paper numbers not found: {path}")
    return pd.read_csv(path)


def _minutes(value: Any, unit: Any) -> float:
    """The paper's time in minutes (Table 3 reports hours)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value * {"min": 1.0, "h": 60.0, "hours": 60.0}.get(str(unit), math.nan)


def _stats(values: pd.Series) -> tuple[float, float]:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def table_frame(name: str, scale: str, results_dir: str | Path = "results",
                controlled_arch: str | None = None, select: str = "final") -> pd.DataFrame:
    """One line per experiment row with measured cells, the paper's cells and the difference.

    `select` ("final" or "best") is which model of each run the cells show: its last epoch's or
    its best epoch's (highest validation PGD accuracy; the record's best_* numbers). A view row
    (`view_of`, `select` in the experiment file) shows its source row's runs at its own select.
    """
    if select not in SELECTS:
        raise ReproError(f"select: '{select}' is not one of {', '.join(SELECTS)}")
    exp = load_experiment(name)
    runs = query.load(results_dir, scale=scale)
    paper = _paper_numbers(exp.paper_csv, results_dir).set_index("row", drop=False)
    lines: list[dict[str, Any]] = []
    for row in exp.rows:
        rid = row["id"]
        store_name, source = exp.source(rid)  # another experiment's, for a view of its row
        if controlled_arch:
            store_name = controlled_name(store_name, controlled_arch)
        mine = runs[(runs["experiment"] == store_name) & (runs["row"] == source)] \
            if not runs.empty else runs
        done = mine[mine["status"] == layout.STATUS_DONE] if not mine.empty else mine
        line: dict[str, Any] = {"row": rid, "method": row.get("label", rid),
                                "arch": None, "dataset": None, "scale": scale, "n_seeds": 0}
        unreadable = not mine.empty and (mine["status"] == layout.STATUS_UNREADABLE).any()
        if unreadable:
            line["status"] = layout.STATUS_UNREADABLE  # `query.problems` says which file
        elif not done.empty:
            if done["cell_hash"].nunique() > 1:
                raise ReproError(f"{name}/{source} at scale {scale}: runs with different "
                                 f"configs ({', '.join(sorted(done['cell_hash'].unique()))}) "
                                 "would be mixed in one cell; remove the stale runs")
            n_failed = int((mine["status"] == layout.STATUS_FAILED).sum())
            line.update(_measured(done, exp.row_select(rid) or select, n_failed))
        else:
            failed = mine[mine["status"] == layout.STATUS_FAILED] if not mine.empty else mine
            line["status"] = (f"failed (epoch {failed['failed_epoch'].iloc[0]})"
                              if not failed.empty else
                              "not supported" if unsupported_reason(exp, rid, scale) else
                              "not run")
        if rid in paper.index:
            p = paper.loc[rid]
            line.update(paper_arch=p.get("arch"), paper_clean=p.get("clean"),
                        paper_pgd=p.get("pgd"), paper_time=p.get("time"),
                        paper_time_unit=p.get("time_unit"), paper_source=p.get("source"),
                        paper_minutes=_minutes(p.get("time"), p.get("time_unit")))
            if "aa" in paper.columns:  # a reference that reports AutoAttack (modern.csv)
                line["paper_aa"] = p.get("aa")
        elif source != rid and source in paper.index:  # beyond the paper: its network only
            line["paper_arch"] = paper.loc[source].get("arch")
        if scale == "paper" and line["status"] == "done":
            line["diff_clean"] = line["clean_acc"] - float(line.get("paper_clean", math.nan))
            line["diff_pgd"] = line["pgd_acc"] - float(line.get("paper_pgd", math.nan))
        lines.append(line)
    # the best-epoch column only where a row shows best epochs: the final tables stay as they were
    best = ["best_epoch"] if select == "best" or any(exp.row_select(r) for r in exp.row_ids) \
        else []
    diffs = ["diff_clean", "diff_pgd"] if scale == "paper" else []
    paper_aa = ["paper_aa"] if "aa" in paper.columns else []
    frame = pd.DataFrame(lines).reindex(columns=COLUMNS + paper_aa + best + diffs)  # always all
    # a count stays a count when some row has none (not run, unreadable): 1000, never 1000.0
    frame["eval_n"] = frame["eval_n"].astype("Int64")
    if best:  # text ("18/19/60") whether or not some row has one
        frame["best_epoch"] = frame["best_epoch"].astype(object)
    return frame


def _measured(done: pd.DataFrame, select: str, n_failed: int) -> dict[str, Any]:
    """The measured cells of one row from its done runs (one per seed), of their final or
    best-epoch models; never a mean over the seeds that have a best epoch and some that don't."""
    arch = done["arch_label"] if "arch_label" in done else done["arch"]
    line: dict[str, Any] = {"arch": arch.iloc[0],
                            "dataset": done["dataset"].iloc[0],
                            "n_seeds": int(len(done))}
    if select == "best":
        if "best_epoch" not in done or done["best_epoch"].isna().any():
            return {**line, "status": "no best epoch (val_n = 0)"}
        done = done.assign(**{k: done.get(f"best_{k}") for k in BEST_SHOWN})
        line["best_epoch"] = _joined(done["best_epoch"])  # per seed: "12" or "12/15/14"
    done = done.assign(cost_pflop=pd.to_numeric(done["train_flops"]) / 1e15,
                       pretrain_pflop=pd.to_numeric(done.get("pretrain_flops"),
                                                    errors="coerce") / 1e15)
    for col in MEASURED:
        mean, std = _stats(done[col]) if col in done else (math.nan, math.nan)
        line[col] = mean
        if col in ("clean_acc", "pgd_acc", "aa_acc"):
            line[col.replace("_acc", "_std")] = std
    if "aa_acc" in done and done["aa_acc"].isna().any():
        line["aa_acc"] = line["aa_std"] = math.nan  # never a mean over some seeds only
    line["eval_n"] = int(done["eval_n"].iloc[0])
    line["aa_n"] = _joined(done.get("aa_n"))
    line["checks"] = cell_checks(done.get("checks"))
    line["status"] = f"done ({n_failed} failed)" if n_failed else "done"  # never hidden
    return line


def cell_checks(values: pd.Series | None) -> str:
    """One cell's checks over its seeds: "ok", the failed checks' names, or "unchecked"."""
    if values is None or values.isna().any():
        return UNCHECKED
    failed = sorted({name for v in values if v != "ok" for name in str(v).split(",")})
    return ",".join(failed) or "ok"


def _joined(values: pd.Series | None) -> str:
    """The distinct values of a per-seed count, e.g. "500" or "500/1000" ("" when absent)."""
    if values is None:
        return ""
    return "/".join(str(int(v)) for v in sorted(set(pd.to_numeric(values).dropna())))


def _pm(mean: Any, std: Any, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    text = f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.{digits}f}"
    return text


def _num(value: Any, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _sci(value: Any) -> str:
    text = _num(value)
    return f"{float(value):.3g}" if text else ""


def _text(column: pd.Series) -> pd.Series:
    """A text column with empty cells for missing values (an all-missing column is float)."""
    return column.astype(object).fillna("")


def display_frame(df: pd.DataFrame, time_unit: str = "min") -> pd.DataFrame:
    """The human-readable table: text cells, ours beside the paper's; times in the paper's unit."""
    per, unit, digits = (60.0, "h", 3) if time_unit in ("h", "hours") else (1.0, "min", 2)
    out = pd.DataFrame({
        "Method": df["method"], "Arch": _text(df["arch"]),
        "Clean": [_pm(m, s) for m, s in zip(df["clean_acc"], df["clean_std"])],
        "PGD": [_pm(m, s) for m, s in zip(df["pgd_acc"], df["pgd_std"])],
        "AA": [_pm(m, s) for m, s in zip(df["aa_acc"], df["aa_std"])],
        f"Time ({unit})": (df["train_minutes"] / per).map(lambda v: _num(v, digits)),
        f"Pre-train ({unit})": (df["pretrain_minutes"] / per).map(lambda v: _num(v, digits)),
        "Cost (PFLOP)": df["cost_pflop"].map(_sci),
        "Seeds": df["n_seeds"],
        "Paper arch": _text(df["paper_arch"]),
        "Paper clean": df["paper_clean"].map(_num),
        "Paper PGD": df["paper_pgd"].map(_num),
        "Paper time": [f"{_num(v, 0)} {u}" if _num(v, 0) else "" for v, u in
                       zip(df["paper_time"], df["paper_time_unit"])],
        "Checks": _text(df["checks"]),
        "Status": df["status"],
    })
    if "paper_aa" in df:
        out.insert(out.columns.get_loc("Paper PGD") + 1, "Paper AA", df["paper_aa"].map(_num))
    failed = ~_text(df["checks"]).isin(["", "ok", UNCHECKED])
    out.loc[failed, "Method"] = out.loc[failed, "Method"] + " †"  # never shown silently
    if "diff_clean" in df:
        out.insert(12, "Δ clean", df["diff_clean"].map(_num))
        out.insert(13, "Δ PGD", df["diff_pgd"].map(_num))
    if "best_epoch" in df:
        out.insert(out.columns.get_loc("Seeds") + 1, "Best epoch", _text(df["best_epoch"]))
    if "val_pgd_acc" in df and df["val_pgd_acc"].notna().any():  # what sweeps select on
        out.insert(out.columns.get_loc("AA") + 1, "Val PGD-10", df["val_pgd_acc"].map(_num))
    return out


def footnote(name: str, scale: str, df: pd.DataFrame, controlled_arch: str | None = None,
             select: str = "final") -> str:
    exp = load_experiment(name)
    n = sorted({int(v) for v in df.get("eval_n", pd.Series(dtype=float)).dropna()})
    n_text = "/".join(str(v) for v in n) or "?"
    aa_counts = _aa_counts(df)
    aa_text = (f"AA: standard AutoAttack ({AA_PACKAGE}: {AA_ATTACKS}) on {aa_counts}. "
               if aa_counts else "AA: not run. ")
    text = (f"Protocol: clean accuracy on the full test set; PGD-20 with α = ε/4, one random "
            f"start, eval-mode model, fp32, on {n_text} fixed test images. {aa_text}"
            f"{CHECKS_NOTE}Time: the row's own "
            "training (AFT: fine-tuning only; its natural pre-training is the Pre-train column). "
            "Cost: training FLOPs counted with torch.utils.flop_counter. "
            f"Scale: {scale}. ")
    if controlled_arch:
        text += f"Controlled: every row on {controlled_arch} (not the rows' reference networks). "
    if df.get("val_pgd_acc", pd.Series(dtype=float)).notna().any():
        text += ("Val PGD-10: PGD-10 (α = ε/4) accuracy on the validation images held out of "
                 "training (val_n), of the model the row shows; choices are made on it, never on "
                 "the test columns. ")
    if "best_epoch" in df:
        text += (("Every row shows" if select == "best" else "A row with a Best epoch shows")
                 + " its runs' best epoch: the checkpoint of the epoch with the highest PGD-10 "
                 "accuracy on the validation images held out of training (val_n; never the "
                 "test images), measured with the protocol above; Time and Cost are the whole "
                 "run's. ")
    if scale != "paper":
        text += ("These are stand-ins, not the paper's setting: " + " ".join(exp.footnote.split()) +
                 " The paper's columns are shown for reference; differences are computed at "
                 "paper scale only.")
    return text


def _aa_counts(df: pd.DataFrame) -> str:
    """On how many of the PGD images AutoAttack ran: "200 of those images", or, where rows
    differ (AutoAttack on all images for the rows a paired comparison uses), which rows had
    which count, the largest first."""
    by_count: dict[str, list[str]] = {}
    for label, count in zip(df.get("method", []), df.get("aa_n", [])):
        if isinstance(count, str) and count:
            by_count.setdefault(count, []).append(str(label))
    if len(by_count) <= 1:
        return "/".join(by_count) + " of those images" if by_count else ""
    ordered = sorted(by_count, key=lambda c: -max(int(v) for v in c.split("/")))
    return "; ".join(f"{count} of those images for {', '.join(by_count[count])}"
                     for count in ordered)


def write_table(name: str, scale: str, results_dir: str | Path = "results",
                controlled_arch: str | None = None, select: str = "final") -> dict[str, Path]:
    """results/tables/<scale>/<name>.{md,csv,tex}; with select "best", <name>-best.*, so the
    final-model table is never replaced by the best-epoch one."""
    source = name  # an experiment's name, or the path of its file
    df = table_frame(name, scale, results_dir, controlled_arch, select)
    exp = load_experiment(name)
    shown = display_frame(df, exp.time_unit)
    note = footnote(name, scale, df, controlled_arch, select)
    out_dir = Path(results_dir) / "tables" / scale
    name = exp.name  # an experiment given as a file path is written under its name
    if controlled_arch:
        name = controlled_name(name, controlled_arch)
    if select == "best":
        name = f"{name}-best"
    md = f"### {exp.title} ({scale} scale)\n\n{shown.to_markdown(index=False)}\n\n{note}\n"
    tex = (shown.to_latex(index=False, escape=True) + "\n% " + note + "\n")
    paths = {"md": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv",
             "tex": out_dir / f"{name}.tex"}
    files.atomic_write_text(paths["md"], md)
    files.atomic_write_text(paths["csv"], df.to_csv(index=False))
    files.atomic_write_text(paths["tex"], tex)
    if select == "final" and not controlled_arch:  # AFT − PGD AT over seeds, where it has seeds
        from .paired import write_paired
        from .tuning import write_tuning
        for path in write_paired(source, scale, results_dir):
            paths[f"paired_{path.suffix[1:]}"] = path
        for path in write_tuning(source, scale, results_dir):
            paths["tuning_md"] = path
    return paths


def tables_with_results(scale: str, results_dir: str | Path = "results") -> list[str]:
    """Experiments that have at least one run at this scale (aggregate renders only these)."""
    runs = query.load(results_dir, scale=scale)
    if runs.empty:
        return []
    from ..experiment import list_experiments
    # controlled variants are rendered by `table --controlled`; figure experiments by figures.py
    known = {e for e in list_experiments() if load_experiment(e).kind == "table"}
    return sorted(e for e in runs["experiment"].dropna().unique() if e in known)
