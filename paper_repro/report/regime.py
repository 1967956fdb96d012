"""The regime search's table and figure, and the criterion the cpu stand-in is chosen by.

DESIGN §2: a stand-in must be in the regime the paper's claim rests on, where long PGD AT
over-fits (PGD accuracy on training images keeps rising after the LR drops while test
robustness peaks and falls). experiments/regime.toml runs PGD AT over capacity × training-set
size and states the criterion as data ([criterion]); this module is the one place that
measures it from a run's per-epoch curves (metrics.csv) and applies it:

    gap  = PGD train − PGD test at the end (mean of the last `window` epochs)
    fall = best `window`-epoch mean of PGD test − its end value   (peak − end)
    peak epoch = the middle epoch of that best window
    meets = gap ≥ min_gap_pp and fall ≥ min_fall_pp and train_minutes ≤ max_train_minutes

Windowed means, because one epoch's PGD on 1,000 images moves by a point or more at a high
LR, and the maximum of a noisy curve is biased upwards. The chosen stand-in is the cheapest
setting (training minutes) that meets the criterion, or none.

`write_regime` renders results/tables/<scale>/regime.{md,csv} and
results/figures/<scale>/regime.{png,pdf} from the store alone (`aggregate` calls it through
`figures.write_figures`); `check_run` applies the criterion to one run folder.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..store import files, layout, query
from ..experiment import EXPERIMENTS_DIR, Experiment, load_experiment
from ..training.methods import resolve_row
from ..errors import ConfigError

EXPERIMENT = "regime"
CURVES = ("test_pgd_acc", "train_pgd_acc")  # metrics.csv columns the criterion reads


@dataclass(frozen=True)
class Criterion:
    """[criterion] of regime.toml: thresholds in percentage points and training minutes."""

    min_gap_pp: float
    min_fall_pp: float
    max_train_minutes: float
    window: int = 5

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"regime criterion: window must be >= 1 epoch, got {self.window}")
        if self.max_train_minutes <= 0:
            raise ConfigError("regime criterion: max_train_minutes must be > 0")

    def describe(self) -> str:
        return (f"PGD train − test gap ≥ {self.min_gap_pp:g} pp, fall of test PGD from its "
                f"peak ≥ {self.min_fall_pp:g} pp, training ≤ {self.max_train_minutes:g} min "
                f"(PGD accuracies as {self.window}-epoch means)")


def load_criterion(path: str | Path | None = None) -> Criterion:
    """The criterion stated in regime.toml (or another experiment file with a [criterion])."""
    path = Path(path) if path else EXPERIMENTS_DIR / f"{EXPERIMENT}.toml"
    try:
        table = tomllib.loads(path.read_text()).get("criterion")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the regime criterion ({e})") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: no [criterion] table")
    fields = {"min_gap_pp": float, "min_fall_pp": float, "max_train_minutes": float,
              "window": int}
    unknown = sorted(set(table) - set(fields))
    missing = sorted(k for k in fields if k not in table and k != "window")
    if unknown or missing:
        raise ConfigError(f"{path}: [criterion] " + (f"unknown {', '.join(unknown)}; " if unknown
                                                    else "") + f"needs {', '.join(fields)}")
    try:
        return Criterion(**{k: fields[k](v) for k, v in table.items()})
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: [criterion] values must be numbers") from None


@dataclass(frozen=True)
class RegimeMetrics:
    """What the criterion reads from one run's curves (accuracies in %, differences in pp)."""

    epochs: int
    end_test_pgd: float
    end_train_pgd: float
    peak_test_pgd: float
    peak_epoch: int

    @property
    def gap_pp(self) -> float:
        return self.end_train_pgd - self.end_test_pgd

    @property
    def fall_pp(self) -> float:
        return self.peak_test_pgd - self.end_test_pgd


def regime_metrics(metrics: pd.DataFrame, window: int) -> RegimeMetrics:
    """Gap, fall and peak epoch from a metrics.csv frame; a run shorter than `window` epochs
    averages over all of them. One-line ConfigError when the curves are absent."""
    missing = [c for c in ("epoch", *CURVES) if c not in metrics]
    if missing or metrics.empty:
        raise ConfigError(f"no per-epoch PGD curves ({', '.join(missing) or 'no epochs'}): "
                          "the run needs monitor_n > 0 and monitor_steps > 0")
    m = metrics.sort_values("epoch").reset_index(drop=True)
    w = min(window, len(m))
    test = m["test_pgd_acc"].rolling(w).mean()  # trailing: index i covers epochs i-w+1 .. i
    best = int(test.idxmax())
    return RegimeMetrics(epochs=int(m["epoch"].iloc[-1]),
                         end_test_pgd=float(test.iloc[-1]),
                         end_train_pgd=float(m["train_pgd_acc"].iloc[-w:].mean()),
                         peak_test_pgd=float(test.iloc[best]),
                         peak_epoch=int(m["epoch"].iloc[best - (w - 1) // 2]))


def failed_parts(m: RegimeMetrics, train_minutes: float, c: Criterion) -> list[str]:
    """The parts of the criterion a setting misses ([] when it meets it)."""
    parts = [("gap", m.gap_pp >= c.min_gap_pp), ("fall", m.fall_pp >= c.min_fall_pp),
             ("time", math.isfinite(train_minutes) and train_minutes <= c.max_train_minutes)]
    return [name for name, ok in parts if not ok]


@dataclass(frozen=True)
class RunCheck:
    metrics: RegimeMetrics
    train_minutes: float
    failed: tuple[str, ...]

    @property
    def meets(self) -> bool:
        return not self.failed


def check_run(run_dir: str | Path, criterion: Criterion | None = None) -> RunCheck:
    """The criterion applied to one run folder of the store (its metrics.csv and record.json),
    e.g. a committed regime run or the chosen stand-in's Table 1 run."""
    run_dir = Path(run_dir)
    criterion = criterion or load_criterion()
    record = layout.read_record(run_dir)
    if not record or record.get("status") != layout.STATUS_DONE:
        raise ConfigError(f"{run_dir}: not a finished run (no record saying done)")
    m = regime_metrics(query.load_metrics(run_dir), criterion.window)
    minutes = float(record.get("train_minutes", math.nan))
    return RunCheck(m, minutes, tuple(failed_parts(m, minutes, criterion)))


# --- the table ----------------------------------------------------------------------------

COLUMNS = ["row", "setting", "arch", "n", "epochs", "gap_pp", "fall_pp", "peak_epoch",
           "peak_test_pgd", "end_test_pgd", "end_train_pgd", "clean_acc", "pgd_acc",
           "train_minutes", "meets", "status"]


def _runs(scale: str, results_dir: str | Path) -> pd.DataFrame:
    runs = query.load(results_dir, scale=scale)
    if runs.empty:
        return runs
    return runs[runs["experiment"] == EXPERIMENT]


def _first_done(runs: pd.DataFrame, row_id: str) -> pd.Series | None:
    """The row's finished run of the lowest seed (the table and the figure show the same)."""
    if runs.empty:
        return None
    done = runs[(runs["row"] == row_id) & (runs["status"] == layout.STATUS_DONE)]
    return None if done.empty else done.sort_values("seed").iloc[0]


def regime_frame(scale: str, results_dir: str | Path = "results",
                 criterion: Criterion | None = None) -> pd.DataFrame:
    """One line per regime row: its first finished seed's curves measured against the
    criterion (`meets`: "yes" or "no: <parts missed>"), or its status."""
    exp, criterion = load_experiment(EXPERIMENT), criterion or load_criterion()
    runs = _runs(scale, results_dir)
    lines: list[dict[str, Any]] = []
    for row in exp.rows:
        planned = resolve_row(exp, row["id"], scale)
        line: dict[str, Any] = {"row": row["id"], "setting": row.get("label", row["id"]),
                                "arch": planned.arch, "n": planned.train_subset,
                                "epochs": planned.epochs, "status": "not run"}
        run = _first_done(runs, row["id"])
        if run is None:
            mine = runs[runs["row"] == row["id"]] if not runs.empty else runs
            if not mine.empty:
                line["status"] = str(mine["status"].iloc[0])
            lines.append(line)
            continue
        line.update(arch=run["arch"], n=run.get("cfg_train_subset"), epochs=run["epochs_done"],
                    clean_acc=run.get("clean_acc"), pgd_acc=run.get("pgd_acc"),
                    train_minutes=float(run.get("train_minutes", math.nan)), status="done")
        try:
            check = check_run(run["run_dir"], criterion)
        except ConfigError:  # monitoring was off: nothing to measure the criterion on
            line["status"] = "done, no per-epoch PGD curves"
            lines.append(line)
            continue
        m = check.metrics
        line.update(gap_pp=m.gap_pp, fall_pp=m.fall_pp, peak_epoch=m.peak_epoch,
                    peak_test_pgd=m.peak_test_pgd, end_test_pgd=m.end_test_pgd,
                    end_train_pgd=m.end_train_pgd,
                    meets="yes" if check.meets else "no: " + ", ".join(check.failed))
        lines.append(line)
    frame = pd.DataFrame(lines).reindex(columns=COLUMNS)
    for col in ("n", "epochs", "peak_epoch"):
        frame[col] = pd.to_numeric(frame[col]).astype("Int64")
    return frame


def chosen(frame: pd.DataFrame) -> pd.Series | None:
    """The cheapest setting (training minutes; the first row on a tie) that meets the
    criterion, or None."""
    meeting = frame[frame["meets"] == "yes"]
    if meeting.empty:
        return None
    return meeting.loc[pd.to_numeric(meeting["train_minutes"]).idxmin()]


@dataclass(frozen=True)
class SecondRule:
    """[second_standin] of regime.toml: which setting Table 1's replica (table1_replica) runs on,
    so that the finding is tested on a second network: the cheapest setting of `prefer_arch`
    that meets the criterion, if one does, else the `fallback` row."""

    prefer_arch: str
    fallback: str


def load_second_rule(path: str | Path | None = None) -> SecondRule:
    path = Path(path) if path else EXPERIMENTS_DIR / f"{EXPERIMENT}.toml"
    table = tomllib.loads(path.read_text()).get("second_standin")
    if not isinstance(table, dict) or set(table) != {"prefer_arch", "fallback"}:
        raise ConfigError(f"{path}: [second_standin] needs prefer_arch and fallback")
    return SecondRule(str(table["prefer_arch"]), str(table["fallback"]))


def second(frame: pd.DataFrame, rule: SecondRule | None = None) -> pd.Series | None:
    """The second stand-in by the stated rule: a setting of the preferred kind that meets the
    criterion (the cheapest), else the fallback row (None when the frame has no such row)."""
    rule = rule or load_second_rule()
    preferred = frame[(frame["meets"] == "yes") & (frame["arch"] == rule.prefer_arch)]
    if not preferred.empty:
        return preferred.loc[pd.to_numeric(preferred["train_minutes"]).idxmin()]
    fallback = frame[frame["row"] == rule.fallback]
    return None if fallback.empty else fallback.iloc[0]


def _num(value: Any, digits: int = 1) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The human-readable table."""
    def count(v: Any) -> str:
        return "" if pd.isna(v) else str(int(v))

    return pd.DataFrame({
        "Setting": frame["setting"], "n": frame["n"].map(count),
        "Epochs": frame["epochs"].map(count),
        "Gap (pp)": frame["gap_pp"].map(_num), "Fall (pp)": frame["fall_pp"].map(_num),
        "Peak epoch": frame["peak_epoch"].map(count),
        "PGD test peak": frame["peak_test_pgd"].map(_num),
        "PGD test end": frame["end_test_pgd"].map(_num),
        "PGD train end": frame["end_train_pgd"].map(_num),
        "Clean": frame["clean_acc"].map(lambda v: _num(v, 2)),
        "PGD-20": frame["pgd_acc"].map(_num),
        "Train (min)": frame["train_minutes"].map(lambda v: _num(v, 2)),
        "Meets": frame["meets"].astype(object).fillna(""),
        "Status": frame["status"],
    })


def verdict(frame: pd.DataFrame) -> str:
    """The one sentence that names the chosen stand-in (and how much of the search it saw)."""
    pick, measured = chosen(frame), int(frame["gap_pp"].notna().sum())
    seen = "" if measured == len(frame) else f" ({measured} of {len(frame)} settings measured)"
    if pick is None:
        return f"Chosen stand-in: none meets it{seen}."
    text = (f"Chosen stand-in: {pick['setting']} on {int(pick['n']):,} images "
            f"({pick['row']}; {_num(pick['train_minutes'], 2)} min of training){seen}.")
    rule = load_second_rule()
    other = second(frame, rule)
    if other is None:
        return text
    why = (f"the cheapest {rule.prefer_arch} setting that meets the criterion"
           if other["arch"] == rule.prefer_arch and other["meets"] == "yes" else
           f"no {rule.prefer_arch} setting meets the criterion, so the stated fallback")
    return text + (f" Second stand-in (table1_replica): {other['setting']} on "
                   f"{int(other['n']):,} images ({other['row']}; {why}).")


def markdown(exp: Experiment, frame: pd.DataFrame, criterion: Criterion, scale: str) -> str:
    return (f"### {exp.title} ({scale} scale)\n\n"
            f"{display_frame(frame).to_markdown(index=False)}\n\n"
            f"Criterion: {criterion.describe()}. {verdict(frame)}\n\n"
            f"{' '.join(exp.footnote.split())} Gap and PGD ends: means of the last "
            f"{criterion.window} epochs; peak: the best {criterion.window}-epoch mean of PGD "
            "test, at the middle epoch of its window; Clean (full test set) and PGD-20 (α = "
            "ε/4, fixed test images) are the final model's; Train: training only, the "
            f"per-epoch monitoring excluded; the lowest seed of each row. Scale: {scale}.\n")


def write_regime(scale: str, results_dir: str | Path = "results") -> list[Path]:
    """regime.{md,csv} in tables/<scale>/ and regime.{png,pdf} in figures/<scale>/, when the
    store holds regime runs at this scale; [] otherwise."""
    runs = _runs(scale, results_dir)
    if runs.empty:
        return []
    from .plots import save_figure  # matplotlib only when there is something to draw

    exp, criterion = load_experiment(EXPERIMENT), load_criterion()
    frame = regime_frame(scale, results_dir, criterion)
    out = Path(results_dir) / "tables" / scale
    md, csv = out / f"{EXPERIMENT}.md", out / f"{EXPERIMENT}.csv"
    files.atomic_write_text(md, markdown(exp, frame, criterion, scale))
    files.atomic_write_text(csv, frame.to_csv(index=False))
    fig = regime_figure(frame, runs, criterion, f"{exp.title} ({scale} scale)")
    return [md, csv, *save_figure(fig, Path(results_dir) / "figures" / scale, EXPERIMENT)]


# --- the figure ---------------------------------------------------------------------------

def regime_figure(frame: pd.DataFrame, runs: pd.DataFrame, criterion: Criterion,
                  title: str) -> Any:
    """One panel per measured setting, in the experiment's row order: PGD test (per epoch and
    as the criterion's windowed mean, drawn at each window's middle epoch, its peak marked) and
    PGD train per epoch, clean test in grey, the LR drops dotted; the title gives gap and
    fall, green where the setting meets the criterion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = frame[frame["gap_pp"].notna()]
    ncols = min(3, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, (_, line) in zip(axes.flat, shown.iterrows()):
        m = query.load_metrics(_first_done(runs, line["row"])["run_dir"])
        ax.plot(m["epoch"], m["test_clean_acc"], color="grey", lw=0.8, alpha=0.7,
                label="clean test")
        ax.plot(m["epoch"], m["train_pgd_acc"], color="C1", lw=1, ls="--", label="PGD train")
        ax.plot(m["epoch"], m["test_pgd_acc"], color="C0", lw=0.6, alpha=0.5, label="PGD test")
        window = min(criterion.window, len(m))
        ax.plot(m["epoch"].iloc[(window - 1) // 2:len(m) - window // 2],
                m["test_pgd_acc"].rolling(window).mean().dropna(), color="C0", lw=1.5,
                label=f"PGD test, {window}-epoch mean")
        ax.plot(line["peak_epoch"], line["peak_test_pgd"], ls="", marker="v", color="C0",
                label="its peak")
        for e in m["epoch"][m["lr"].diff() < 0]:
            ax.axvline(e - 0.5, color="grey", ls=":", lw=0.8)
        meets = line["meets"] == "yes"
        ax.set_title(f"{line['setting']}, n = {int(line['n']):,}\ngap {line['gap_pp']:.1f} pp, "
                     f"fall {line['fall_pp']:.1f} pp" + (" (meets)" if meets else ""),
                     fontsize=8, color="green" if meets else "black")
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)", fontsize=8)
    if len(shown):
        axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}; dotted: LR drops", fontsize=10)
    fig.tight_layout()
    return fig
