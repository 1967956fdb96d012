"""Did it reproduce? A re-run store compared with the committed one (or the paper), cell by cell.

Floating point differs across CPU types and GPUs, and a difference in the fifth digit of the
first epoch's loss grows into a different model, so a re-run on another machine never matches
digit for digit: whether a result reproduces is a statistical question, answered here by a
stated rule rather than by the reader's eye. Per row of the table (view rows such as PGD AT
(early stop) at their own select, as the table shows them) and metric (clean, PGD-20, AA):

- Reference: the committed store (`--against`, default results/), n seeds with mean m and
  standard deviation s; re-run: k seeds with mean r. `reproduced` when r lies in the committed
  95% prediction interval for the mean of k new seeds, m ± t(0.975, n−1) · s' · √(1/n + 1/k);
  `differs` otherwise; `no verdict` when n < 2 or k < 1 (the Why column says which).
- s' = max(s, b), b the binomial standard error of an accuracy p measured on N images,
  100 · √(p(1−p)/N) points (p = m/100 clipped to [1/N, 1 − 1/N]; N the records' eval_n for
  clean and PGD-20, aa_n for AA), so that three seeds that happen to agree do not make a
  0.1-point interval. (Clean accuracy is measured on the whole test set; flooring it at eval_n
  images is the conservative choice.)
- Paired differences (the experiment file's `pairs`, e.g. AFT − PGD AT (early stop)): the same rule
  on the per-seed differences (seeds common to both rows), with b = √(b_row² + b_baseline²).
  Sign: when the committed 95% interval of the mean difference (paired.interval, as
  <table>_paired.md shows it) excludes 0, the conclusion `holds` if the re-run's mean
  difference has its sign and is `FLIPPED` if not; an interval spanning 0 claims no sign.
- Paper scale: the reference is the paper (results/paper/<table>.csv; clean and PGD-20):
  `reproduced` when the paper's number lies in the re-run's own 95% prediction interval for one
  new value, r ± t(0.975, k−1) · s' · √(1 + 1/k) (b at p = r/100); with k < 2 the difference
  and `no verdict`. The paper gives no AutoAttack column and no figure numbers in
  results/paper/, so those cells have no verdict.

Written to <fresh store>/verify/<scale>/<table>.{md,csv}, with the CPUs of both stores' runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .. import results
from ..experiment import load_experiment
from ..errors import ReproError
from .paired import METRICS, interval, per_seed, t_quantile
from .tables import _paper_numbers

COUNT = {"clean_acc": "eval_n", "pgd_acc": "eval_n", "aa_acc": "aa_n"}  # images behind a metric
PAPER_COLUMN = {"clean_acc": "clean", "pgd_acc": "pgd"}  # results/paper/*.csv; no AA there
REPRODUCED, DIFFERS, NO_VERDICT = "reproduced", "differs", "no verdict"


def binomial_se(mean_pct: float, n_images: float) -> float:
    """Standard error (in points) of an accuracy measured on n_images; 0 when unknown. p is
    clipped to [1/N, 1 − 1/N] so that a 0% or 100% cell still has a non-zero floor."""
    if not n_images or math.isnan(n_images) or math.isnan(mean_pct):
        return 0.0
    p = min(max(mean_pct / 100, 1 / n_images), 1 - 1 / n_images)
    return 100 * math.sqrt(p * (1 - p) / n_images)


def committed_interval(values: pd.Series, k: int, floor: float) -> tuple[float, float, float]:
    """(s', low, high): the committed 95% prediction interval for the mean of k new seeds."""
    n, mean = len(values), float(values.mean())
    s = max(float(values.std(ddof=1)), floor)
    half = t_quantile(n - 1) * s * math.sqrt(1 / n + 1 / k)
    return s, mean - half, mean + half


def rerun_interval(values: pd.Series, floor: float) -> tuple[float, float, float]:
    """(s', low, high): the re-run's own 95% prediction interval for one new value."""
    k, mean = len(values), float(values.mean())
    s = max(float(values.std(ddof=1)), floor)
    half = t_quantile(k - 1) * s * math.sqrt(1 + 1 / k)
    return s, mean - half, mean + half


def _count(frame: pd.DataFrame, key: str) -> float:
    counts = frame[COUNT[key]].dropna() if COUNT[key] in frame else pd.Series(dtype=float)
    return float(counts.min()) if not counts.empty else math.nan


def _line(values: pd.Series, rerun: pd.Series, floor: float, paper: float | None = None
          ) -> dict[str, Any]:
    """One compared cell: the reference (committed values, or the paper's number at paper
    scale), the re-run, the difference, the interval and the verdict with its reason."""
    k = len(rerun)
    r = float(rerun.mean()) if k else math.nan
    line: dict[str, Any] = {"k": k, "rerun_mean": r,
                            "rerun_values": " / ".join(f"{v:.2f}" for v in rerun),
                            "rerun_std": float(rerun.std(ddof=1)) if k > 1 else math.nan,
                            "floor": floor, "s_used": math.nan, "pi_low": math.nan,
                            "pi_high": math.nan, "verdict": NO_VERDICT, "why": ""}
    if paper is not None:  # paper scale: the paper's number in the re-run's own interval
        line.update(reference="paper", n=math.nan, ref_mean=paper, ref_std=math.nan,
                    diff=r - paper)
        if math.isnan(paper):
            line["why"] = "the paper gives no number"
        elif k < 2:
            line["why"] = f"{k} re-run seed(s); a prediction interval needs ≥ 2"
        else:
            s, low, high = rerun_interval(rerun, floor)
            line.update(s_used=s, pi_low=low, pi_high=high,
                        verdict=REPRODUCED if low <= paper <= high else DIFFERS)
        return line
    n = len(values)
    m = float(values.mean()) if n else math.nan
    line.update(reference="committed", n=n, ref_mean=m,
                ref_std=float(values.std(ddof=1)) if n > 1 else math.nan, diff=r - m)
    if n < 2 or k < 1:
        line["why"] = (f"{n} committed seed(s); the interval needs ≥ 2" if n < 2 else
                       "no re-run seed")
        return line
    s, low, high = committed_interval(values, k, floor)
    line.update(s_used=s, pi_low=low, pi_high=high,
                verdict=REPRODUCED if low <= r <= high else DIFFERS)
    return line


def _machines(frames: list[pd.DataFrame]) -> str:
    """The CPUs (and torch threads) of the runs behind some cells, e.g. "AMD EPYC (1 thread)
    × 27 runs": floating point, so bit-identity, depends on them."""
    seen: dict[str, int] = {}
    run_dirs = {d for f in frames for d in f.get("run_dir", pd.Series(dtype=object)).dropna()}
    for run_dir in sorted(run_dirs):  # each run once: a view row shares its source's runs
        try:
            hardware = (results.read_record(Path(run_dir)) or {}).get("hardware") or {}
        except results.UnreadableRunError:
            continue
        threads = hardware.get("torch_threads")
        name = str(hardware.get("cpu") or "unknown CPU") + (
            f" ({threads} thread{'s' if threads != 1 else ''})" if threads else "")
        seen[name] = seen.get(name, 0) + 1
    return ", ".join(f"{name} × {count} run{'s' if count != 1 else ''}"
                     for name, count in seen.items()) or "-"


def _seeds_frame(runs: pd.DataFrame, experiment: str, row_id: str) -> pd.DataFrame:
    return per_seed(runs, experiment, row_id) if not runs.empty else pd.DataFrame()


def _cell_hashes(runs: pd.DataFrame, experiment: str, source: str) -> set[str]:
    if runs.empty or "cell_hash" not in runs:
        return set()
    mine = runs[(runs["experiment"] == experiment) & (runs["row"] == source)
                & (runs["status"] == results.STATUS_DONE)]
    return set(mine["cell_hash"].dropna())


def verify_frame(experiment: str, scale: str, fresh_dir: str | Path,
                 against: str | Path = "results") -> pd.DataFrame:
    """One line per compared cell (row × metric, then pair × metric) of the re-run store
    `fresh_dir` against `against` (at paper scale: against the paper's CSV)."""
    exp = load_experiment(experiment)
    fresh_dir, against = Path(fresh_dir), Path(against)
    if scale != "paper" and fresh_dir.resolve() == against.resolve():
        raise ReproError(f"verify: {fresh_dir} would be compared with itself; give the re-run "
                         "store with --results-dir and the committed one with --against")
    for label, path in (("re-run store", fresh_dir), ("committed store", against)):
        if not path.is_dir() and not (label == "committed store" and scale == "paper"):
            raise ReproError(f"verify: {label} {path} does not exist")
    fresh = results.load(fresh_dir, scale=scale)
    if fresh.empty or not (fresh["experiment"] == exp.name).any():
        raise ReproError(f"verify: no {scale}-scale runs of {exp.name} in "
                         f"{results.runs_root(fresh_dir)}; run `./reproduce.sh {exp.name} "
                         f"--fresh --scale {scale}` first")
    on_paper = scale == "paper"
    committed = pd.DataFrame() if on_paper else results.load(against, scale=scale)
    paper = _paper_numbers(exp.paper_csv, fresh_dir).set_index("row") if on_paper else None
    lines: list[dict[str, Any]] = []
    seeds: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    for row_id in exp.row_ids:
        new = _seeds_frame(fresh, exp.name, row_id)
        if new.empty:
            continue  # not re-run: listed under the table, not compared
        old = _seeds_frame(committed, exp.name, row_id)
        seeds[row_id] = (old, new)
        source = exp.source_row(row_id)
        old_hash, new_hash = (_cell_hashes(committed, exp.name, source),
                              _cell_hashes(fresh, exp.name, source))
        config = ("" if on_paper or not old_hash else
                  "same" if old_hash == new_hash else "differs")
        for key, name in METRICS:
            rerun = new[key].dropna()
            reference = old[key].dropna() if not old.empty else pd.Series(dtype=float)
            if rerun.empty and reference.empty:
                continue  # e.g. AA off at this scale on both sides
            paper_value = None
            if on_paper:
                column = PAPER_COLUMN.get(key)
                paper_value = (float(paper.loc[row_id, column])
                               if column and row_id in paper.index else math.nan)
                floor = binomial_se(float(rerun.mean()) if len(rerun) else math.nan,
                                    _count(new, key))
            else:
                floor = binomial_se(float(reference.mean()) if len(reference) else math.nan,
                                    _count(old, key))
            line = _line(reference, rerun, floor, paper_value)
            lines.append({"kind": "row", "row": row_id, "baseline": "",
                          "label": exp.row(row_id).get("label", row_id), "metric": name,
                          "config": config, **line,
                          "committed_cpu": "" if on_paper else _machines([old]),
                          "rerun_cpu": _machines([new])})
    lines += _paired_lines(exp, seeds, on_paper, paper)
    frame = pd.DataFrame(lines)
    compared = frame[(frame["k"] >= 1) & frame["ref_mean"].notna()] if not frame.empty else frame
    if compared.empty:
        if on_paper:
            reference = f"the paper's numbers ({exp.paper_csv or 'no CSV in results/paper/'})"
        elif committed.empty or not (committed["experiment"] == exp.name).any():
            reference = f"{against} (it holds no {scale}-scale runs of {exp.name})"
        else:
            reference = str(against)
        raise ReproError(f"verify: nothing to compare for {exp.name} at scale {scale}: no row "
                         f"of {fresh_dir} has a counterpart in {reference}")
    frame.attrs["not_rerun"] = [r for r in exp.row_ids if r not in seeds]
    sides = {"re-run": [new for _, new in seeds.values()]}
    if not on_paper:
        sides = {"committed": [old for old, _ in seeds.values()], **sides}
    frame.attrs["machines"] = {side: _machines(frames) for side, frames in sides.items()}
    return frame


def _paired_lines(exp: Any, seeds: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
                  on_paper: bool, paper: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The paired differences of the table, compared like cells, and whether their sign holds."""
    lines: list[dict[str, Any]] = []
    for row_id, base_id in exp.pairs:
        if row_id not in seeds or base_id not in seeds:
            continue
        (old_row, new_row), (old_base, new_base) = seeds[row_id], seeds[base_id]
        label = (f"{exp.row(row_id).get('label', row_id)} − "
                 f"{exp.row(base_id).get('label', base_id)}")
        for key, name in METRICS:
            rerun = _differences(new_row, new_base, key)
            reference = _differences(old_row, old_base, key)
            if rerun.empty and reference.empty:
                continue
            side_row, side_base = (new_row, new_base) if on_paper else (old_row, old_base)
            at = rerun if on_paper else reference
            floor = math.hypot(
                binomial_se(float(side_row[key].mean()) if len(at) else math.nan,
                            _count(side_row, key)),
                binomial_se(float(side_base[key].mean()) if len(at) else math.nan,
                            _count(side_base, key)))
            paper_value = None
            if on_paper:
                column = PAPER_COLUMN.get(key)
                paper_value = (float(paper.loc[row_id, column]) - float(paper.loc[base_id, column])
                               if column and row_id in paper.index and base_id in paper.index
                               else math.nan)
            line = _line(reference, rerun, floor, paper_value)
            line.update(_sign(reference, rerun, paper_value))
            lines.append({"kind": "paired", "row": row_id, "baseline": base_id, "label": label,
                          "metric": name, "config": "", **line,
                          "committed_cpu": "" if on_paper else _machines([old_row, old_base]),
                          "rerun_cpu": _machines([new_row, new_base])})
    return lines


def _differences(row: pd.DataFrame, base: pd.DataFrame, key: str) -> pd.Series:
    """Per-seed differences row − baseline over the seeds both have (paired by seed)."""
    if row.empty or base.empty:
        return pd.Series(dtype=float)
    common = sorted(set(row.index) & set(base.index))
    return (row.loc[common, key] - base.loc[common, key]).dropna()


def _sign(reference: pd.Series, rerun: pd.Series, paper: float | None) -> dict[str, Any]:
    """Whether the re-run keeps the sign of the reference's conclusion. The committed side
    claims a sign only when its 95% interval of the mean difference excludes 0; the paper's
    number (no interval) claims its own sign."""
    if rerun.empty:
        return {"ref_interval": "", "sign": "no re-run"}
    if paper is not None:
        if math.isnan(paper) or paper == 0:
            return {"ref_interval": "", "sign": "no claim"}
        claimed, shown = math.copysign(1, paper), ""
    else:
        if len(reference) < 2:
            return {"ref_interval": "", "sign": "no claim (< 2 committed seeds)"}
        _, low, high = interval(reference)
        shown = f"[{low:+.2f}, {high:+.2f}]"
        if low <= 0 <= high:
            return {"ref_interval": shown, "sign": "no claim (interval spans 0)"}
        claimed = 1.0 if low > 0 else -1.0
    mean = float(rerun.mean())
    return {"ref_interval": shown,
            "sign": "holds" if mean * claimed > 0 else "FLIPPED"}


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(value) else f"{value:{'+' if signed else ''}.{digits}f}"


def render(frame: pd.DataFrame, experiment: str, scale: str, fresh_dir: str | Path,
           against: str | Path) -> str:
    """The Markdown report: one table of cells, one of paired differences, the rule, machines."""
    exp = load_experiment(experiment)
    on_paper = scale == "paper"
    reference = "Paper" if on_paper else "Committed (mean ± std, n)"

    def ref(line: pd.Series) -> str:
        if on_paper:
            return _fmt(line["ref_mean"])
        text = _fmt(line["ref_mean"])
        if text and not math.isnan(line["ref_std"]):
            text += f" ± {_fmt(line['ref_std'])}"
        return f"{text} ({line['n']})" if text else "-"

    def shown(part: pd.DataFrame, paired: bool) -> pd.DataFrame:
        out = pd.DataFrame({
            "Comparison" if paired else "Row": part["label"], "Metric": part["metric"],
            reference: [ref(line) for _, line in part.iterrows()],
            "Re-run (per seed)": part["rerun_values"].where(part["k"] > 0, "-"),
            "Δ (pp)": part["diff"].map(lambda v: _fmt(v, signed=True)),
            "95% PI": [f"[{_fmt(lo)}, {_fmt(hi)}]" if _fmt(lo) else "" for lo, hi in
                       zip(part["pi_low"], part["pi_high"])],
            "Verdict": part["verdict"], "Why": part["why"],
        })
        if paired:
            out.insert(6, "Committed 95% CI" if not on_paper else "Paper sign",
                       part["ref_interval"] if not on_paper else
                       part["ref_mean"].map(lambda v: _fmt(v, signed=True)))
            out.insert(8, "Sign", part["sign"])
        elif not on_paper and (part["config"] == "differs").any():
            out.insert(2, "Config", part["config"])
        return out

    cells, pairs = frame[frame["kind"] == "row"], frame[frame["kind"] == "paired"]
    counts = frame["verdict"].value_counts()
    title = (f"### Did it reproduce? {exp.title} ({scale} scale): re-run {fresh_dir} against "
             + ("the paper" if on_paper else str(against)))
    text = [title, "",
            f"{counts.get(REPRODUCED, 0)} reproduced, {counts.get(DIFFERS, 0)} differ, "
            f"{counts.get(NO_VERDICT, 0)} without a verdict"
            + (f"; {int((pairs['sign'] == 'FLIPPED').sum())} paired conclusion(s) flipped"
               if not pairs.empty else "") + ".", "",
            shown(cells, False).to_markdown(index=False, disable_numparse=True), ""]
    if not pairs.empty:
        text += ["Paired differences (per seed, row − baseline):", "",
                 shown(pairs, True).to_markdown(index=False, disable_numparse=True), ""]
    not_rerun = frame.attrs.get("not_rerun", [])
    machines = frame.attrs.get("machines", {})
    if not on_paper and (cells["config"] == "differs").any():
        text += ["Config differs: the re-run's config hash is not the committed runs' (other "
                 "flags, or code that changed the recipe), so its numbers may differ for that "
                 "reason alone.", ""]
    text += [_rule(on_paper), "",
             "Machines: " + "; ".join(f"{side} {cpus}" for side, cpus in machines.items()) + ".",
             *([f"Not re-run (not compared): {', '.join(not_rerun)}."] if not_rerun else []), ""]
    return "\n".join(text)


def _rule(on_paper: bool) -> str:
    floor = ("s' = max(s, b), b = 100·√(p(1−p)/N) the binomial standard error of the accuracy "
             "on its N images (eval_n for clean and PGD-20, aa_n for AA; p clipped to "
             "[1/N, 1−1/N]); for a paired difference b = √(b_row² + b_baseline²).")
    if on_paper:
        return ("Rule: reproduced when the paper's number lies in the re-run's 95% prediction "
                "interval for one new value, r ± t(0.975, k−1)·s'·√(1 + 1/k) over its k ≥ 2 "
                f"seeds; {floor} One seed: the difference only (no verdict). Sign: whether "
                "the re-run's mean difference has the sign of the paper's.")
    return ("Rule: reproduced when the re-run's mean over its k seeds lies in the committed 95% "
            "prediction interval for a mean of k new seeds, m ± t(0.975, n−1)·s'·√(1/n + 1/k) "
            f"(n committed seeds, mean m, std s; n ≥ 2, k ≥ 1); {floor} Sign: where the "
            "committed 95% interval of a mean paired difference excludes 0, whether the "
            "re-run's mean difference keeps that sign (FLIPPED if not). Bit-identical numbers "
            "are expected only on the same CPU model, thread count and code.")


def write_verify(experiment: str, scale: str, fresh_dir: str | Path,
                 against: str | Path = "results") -> dict[str, Path]:
    """<fresh>/verify/<scale>/<experiment>.{md,csv}: the comparison, also returned as text."""
    frame = verify_frame(experiment, scale, fresh_dir, against)
    name = load_experiment(experiment).name
    out_dir = Path(fresh_dir) / "verify" / scale
    paths = {"md": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv"}
    results.atomic_write_text(paths["md"], render(frame, experiment, scale, fresh_dir, against))
    results.atomic_write_text(paths["csv"], frame.to_csv(index=False))
    return paths
