"""A row tuned on validation: which of a sweep's settings its stated rule picks, and whether the
row's recipe is that pick.

An experiment row may carry `tuned = { sweep, among, metric, tie }` (table1.toml's AFT (tuned)):
its recipe is the one, among the `among` rows of the `sweep` experiment, with the highest
`metric` (a validation score of the record, mean over the sweep's done seeds), a tie going to
fewer training FLOPs. The row states its recipe itself (a config never depends on the store);
this module applies the rule to the sweep's records, so `aggregate` shows the evidence
(<table>_tuning.md) and the tests check that the row's recipe is the pick.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiment import Experiment, load_experiment
from ..errors import ReproError
from ..store import files, layout, query
from ..training.methods import resolve_row

TIE_RULES = ("fewer train_flops",)
METRIC_NAMES = {"val_pgd_acc": "Val PGD-10"}  # as the tables name the record's keys


def tuned_rows(exp: Experiment) -> list[str]:
    return [r["id"] for r in exp.rows if "tuned" in r]


def candidates(exp: Experiment, row_id: str, scale: str,
               results_dir: str | Path = "results") -> pd.DataFrame:
    """One line per candidate setting: its sweep row, label, metric (mean over its done seeds),
    training FLOPs and seeds; NaN metric where the sweep has no done run of it."""
    rule = _rule(exp, row_id)
    sweep = load_experiment(rule["sweep"])
    runs = query.load(results_dir, scale=scale)
    lines: list[dict[str, Any]] = []
    for candidate in rule["among"]:
        label = sweep.row(candidate).get("label", candidate)
        done = runs[(runs["experiment"] == sweep.name) & (runs["row"] == candidate)
                    & (runs["status"] == layout.STATUS_DONE)] if not runs.empty else runs
        metric = (pd.to_numeric(done[rule["metric"]], errors="coerce")
                  if not done.empty and rule["metric"] in done else pd.Series(dtype=float))
        flops = (pd.to_numeric(done["train_flops"], errors="coerce")
                 if not done.empty and "train_flops" in done else pd.Series(dtype=float))
        lines.append({"sweep_row": candidate, "label": label, "metric": metric.mean(),
                      "train_flops": flops.mean(), "seeds": int(metric.notna().sum())})
    return pd.DataFrame(lines)


def pick(exp: Experiment, row_id: str, scale: str, results_dir: str | Path = "results",
         table: pd.DataFrame | None = None) -> str:
    """The sweep row the rule picks (from `table`, the candidates, when the caller has them);
    an error when a candidate has no done run (the rule is over every setting it names, never
    over those that happen to be stored)."""
    rule = _rule(exp, row_id)
    table = candidates(exp, row_id, scale, results_dir) if table is None else table
    missing = table.loc[table["metric"].isna(), "sweep_row"].tolist()
    if missing:
        raise ReproError(f"{exp.name} row '{row_id}': the tuning rule needs every candidate's "
                         f"{rule['metric']} at scale {scale}; not in the store: "
                         f"{', '.join(missing)} (run `sweep {rule['sweep']}`)")
    best = table.sort_values(["metric", "train_flops"], ascending=[False, True], kind="stable")
    return str(best["sweep_row"].iloc[0])


def recipe_key(exp: Experiment, row_id: str, scale: str) -> str:
    """The row's config hash without its identity (experiment, row): equal for two rows that
    train the same thing the same way."""
    return resolve_row(exp, row_id, scale).config_hash(exclude=("experiment", "row"))


def matches_pick(exp: Experiment, row_id: str, scale: str, chosen: str) -> bool:
    """Does the row train exactly what the sweep's chosen row trained (seed 0, this scale)?"""
    sweep = load_experiment(_rule(exp, row_id)["sweep"])
    return recipe_key(exp, row_id, scale) == recipe_key(sweep, chosen, scale)


def write_tuning(experiment: str, scale: str, results_dir: str | Path = "results") -> list[Path]:
    """<table>_tuning.md: for each tuned row, its rule, the candidates' validation scores, the
    pick and whether the row's recipe is it; nothing when the table has no tuned row or its
    sweep is not in the store at this scale."""
    exp = load_experiment(experiment)
    parts: list[str] = []
    for row_id in tuned_rows(exp):
        rule = _rule(exp, row_id)
        metric_name = METRIC_NAMES.get(rule["metric"], rule["metric"])
        table = candidates(exp, row_id, scale, results_dir)
        if table["metric"].isna().all():
            continue
        try:
            chosen = pick(exp, row_id, scale, results_dir, table)
        except ReproError as e:
            chosen, verdict = "", f"no pick: {e}"
        else:
            verdict = ("yes" if matches_pick(exp, row_id, scale, chosen) else
                       "NO: the row's recipe is not the pick; its numbers are not the tuned ones")
        shown = pd.DataFrame({
            "Setting": table["label"],
            metric_name: table["metric"].map(lambda v: "" if math.isnan(v) else f"{v:.2f}"),
            "Cost (PFLOP)": table["train_flops"].map(
                lambda v: "" if math.isnan(v) else f"{v / 1e15:.3g}"),
            "Seeds": table["seeds"],
            "Picked": ["←" if r == chosen else "" for r in table["sweep_row"]]})
        label = exp.row(row_id).get("label", row_id)
        parts += [f"#### {label}: the {rule['sweep']} setting its rule picks",
                  "", shown.to_markdown(index=False), "",
                  f"Rule: the highest {metric_name} (mean over the sweep's seeds; validation "
                  f"images only, never the test columns) among the settings above; a tie goes to "
                  f"{rule['tie'].replace('fewer train_flops', 'fewer training FLOPs')}. Pick: "
                  f"{chosen or '-'}. The row's recipe is the pick: {verdict}.", ""]
    if not parts:
        return []
    out = Path(results_dir) / "tables" / scale / f"{exp.name}_tuning.md"
    title = f"### {exp.title}: rows tuned on validation ({scale} scale)"
    files.atomic_write_text(out, "\n".join([title, "", *parts]).rstrip() + "\n")
    return [out]


def _rule(exp: Experiment, row_id: str) -> dict[str, Any]:
    rule = exp.row(row_id).get("tuned")
    if not isinstance(rule, dict) or not {"sweep", "among", "metric"} <= set(rule) \
            or rule.get("tie", TIE_RULES[0]) not in TIE_RULES:
        raise ReproError(f"{exp.name} row '{row_id}': tuned must be {{ sweep = \"<experiment>\", "
                         f"among = [<its rows>], metric = \"<record key>\", tie = "
                         f"\"{TIE_RULES[0]}\" }}; got {rule!r}")
    return {"tie": TIE_RULES[0], **rule}
