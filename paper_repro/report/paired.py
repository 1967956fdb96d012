"""Paired differences over seeds: is AFT better than PGD AT, and by how much?

Every row's seed k draws its data order and initial weights from seed k, and every row
validates and tests on the same images, so two rows' numbers at one seed form a pair; the mean
of the per-seed differences gets a 95% Student-t interval (scipy), mean ± t(0.975, n−1)·sd/√n.
A table with no pair, or a pair with fewer than two common seeds, writes nothing.
Rows are shown as their tables show them: a view row (PGD AT early stop) at its best epoch.
Written beside the table as results/tables/<scale>/<table>_paired.{md,csv}.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from .. import results
from ..experiment import load_experiment

METRICS = (("clean_acc", "clean"), ("pgd_acc", "PGD-20"), ("aa_acc", "AA"))
CONFIDENCE = 0.95


def per_seed(runs: pd.DataFrame, experiment: str, row_id: str) -> pd.DataFrame:
    """One line per seed of a row's done runs, its metrics at the row's select, its cost, and
    the image counts and run folder (verify.py floors intervals at the counts' binomial error
    and reads each run's machine from its folder)."""
    exp = load_experiment(experiment)
    (stored_in, source), select = exp.source(row_id), exp.row_select(row_id) or "final"
    done = runs[(runs["experiment"] == stored_in) & (runs["row"] == source)
                & (runs["status"] == results.STATUS_DONE)]
    prefix = "best_" if select == "best" else ""
    out = pd.DataFrame({"seed": done["seed"].astype(int)})
    for key, _ in METRICS:
        column = f"{prefix}{key}"
        out[key] = pd.to_numeric(done[column], errors="coerce") if column in done else math.nan
    for column in ("eval_n", "aa_n"):
        out[column] = pd.to_numeric(done[column], errors="coerce") if column in done else math.nan
    out["run_dir"] = done["run_dir"]
    out["train_flops"] = (pd.to_numeric(done["train_flops"], errors="coerce")
                          if "train_flops" in done else math.nan)
    out["pretrain_flops"] = (pd.to_numeric(done["pretrain_flops"], errors="coerce")
                             if "pretrain_flops" in done else math.nan)
    return out.set_index("seed")


def t_quantile(df: int) -> float:
    """The two-sided 95% Student-t quantile with `df` degrees of freedom."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def interval(diffs: pd.Series) -> tuple[float, float, float]:
    """Mean and the 95% Student-t interval of paired differences (n >= 2)."""
    n, mean, sd = len(diffs), float(diffs.mean()), float(diffs.std(ddof=1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_frame(experiment: str, scale: str, results_dir: str | Path = "results") -> pd.DataFrame:
    """One line per (pair, metric): seeds, mean difference, its 95% interval; plus the row's
    training FLOPs relative to the baseline's, without and with its pre-training."""
    runs = results.load(results_dir, scale=scale)
    lines: list[dict[str, Any]] = []
    if runs.empty:
        return pd.DataFrame(lines)
    exp = load_experiment(experiment)
    for row_id, base_id in exp.pairs:
        row, base = per_seed(runs, experiment, row_id), per_seed(runs, experiment, base_id)
        seeds = sorted(set(row.index) & set(base.index))
        if len(seeds) < 2:
            continue
        row, base = row.loc[seeds], base.loc[seeds]
        flops = float(row["train_flops"].mean() / base["train_flops"].mean())
        with_pretrain = float((row["train_flops"] + row["pretrain_flops"].fillna(0)).mean()
                              / base["train_flops"].mean())
        for key, name in METRICS:
            diffs = (row[key] - base[key]).dropna()
            if len(diffs) < 2:
                continue
            mean, low, high = interval(diffs)
            if key == "aa_acc":
                name = _aa_name(row, base)
            lines.append({"row": row_id, "baseline": base_id,
                          "comparison": f"{exp.row(row_id).get('label', row_id)} − "
                                        f"{exp.row(base_id).get('label', base_id)}",
                          "metric": name, "seeds": len(diffs), "mean_diff": mean,
                          "ci_low": low, "ci_high": high,
                          "per_seed": " / ".join(f"{d:+.1f}" for d in diffs),
                          "flops_ratio": flops, "flops_ratio_with_pretrain": with_pretrain})
    return pd.DataFrame(lines)


def _aa_name(row: pd.DataFrame, base: pd.DataFrame) -> str:
    """"AA", or "AA (1000 vs 200 images)" where the two rows ran AutoAttack on different
    numbers of the PGD images: their difference is then one of estimates on different images,
    not paired image by image."""
    counts = ["/".join(str(int(n)) for n in sorted(set(side["aa_n"].dropna())))
              for side in (row, base)]
    return "AA" if counts[0] == counts[1] else f"AA ({counts[0]} vs {counts[1]} images)"


def write_paired(experiment: str, scale: str, results_dir: str | Path = "results") -> list[Path]:
    """<table>_paired.{md,csv} when the table has a pair with >= 2 common seeds, else nothing."""
    exp = load_experiment(experiment)
    if not exp.pairs:
        return []
    frame = paired_frame(experiment, scale, results_dir)
    if frame.empty:
        return []
    shown = pd.DataFrame({
        "Comparison": frame["comparison"], "Metric": frame["metric"], "Seeds": frame["seeds"],
        "Mean difference (pp)": frame["mean_diff"].map(lambda v: f"{v:+.2f}"),
        "95% interval (pp)": [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in
                              zip(frame["ci_low"], frame["ci_high"])],
        "Per seed (pp)": frame["per_seed"],
        "FLOPs ratio": frame["flops_ratio"].map(lambda v: f"{v:.3f}"),
        "FLOPs ratio incl. pre-training": frame["flops_ratio_with_pretrain"].map(
            lambda v: f"{v:.3f}"),
    })
    if exp.name == "table1":
        views = ("(PGD AT (early stop): the PGD AT runs' best validation epoch)",
                 "(an early-stopped PGD AT run trains as long as PGD AT)",
                 "(AFT (+500K): the student's, on the labelled and pseudo-labelled images; its "
                 "teacher not counted)")
    else:
        views = ("(an (early stop) row: its runs' best validation epoch)",
                 "(an early-stopped run trains as long as the full one)", "(AFT rows)")
    note = ("Differences over seeds, paired by seed (seed k of each row), of the models the "
            f"table shows {views[0]}; 95% "
            "Student-t interval of the mean difference. FLOPs ratio: the row's training FLOPs "
            f"over the baseline's {views[1]}; incl. "
            f"pre-training: with its natural pre-training {views[2]}. Scale: {scale}.")
    if frame["metric"].str.contains(" vs ").any():
        note += (" AA (N vs M images): the two rows ran AutoAttack on different numbers of the "
                 "PGD images (the rows of Table 1's own comparisons on all of them), so that "
                 "difference is one of estimates on different images, not paired image by image.")
    out_dir = Path(results_dir) / "tables" / scale
    title = f"### {exp.title}: paired differences ({scale} scale)"
    # a file path is written under the experiment's name
    md, csv = out_dir / f"{exp.name}_paired.md", out_dir / f"{exp.name}_paired.csv"
    results.atomic_write_text(md, f"{title}\n\n{shown.to_markdown(index=False)}\n\n{note}\n")
    results.atomic_write_text(csv, frame.to_csv(index=False))
    return [md, csv]
