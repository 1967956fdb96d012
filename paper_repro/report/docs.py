"""README.md and docs/*.md blocks written from the store, so no result in prose is typed by hand.

A marked block

    <!-- NAME:SCALE -->
    ...
    <!-- /NAME:SCALE -->

is rewritten by `aggregate` (default store only) from the files the store already renders:
NAME an experiment (`table1`, `regime`, `modern`, ...) or `<experiment>_paired` copies the table of
results/tables/SCALE/NAME.md; the few views below (`table1-compact`, `paired-aft`, `bench`) pick
cells from the same files, verbatim. A table not rendered yet leaves one line saying so. Files
are written only when a block changes, so `aggregate` stays byte-stable, and tests/test_docs.py
fails when a block differs from what this module renders.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from ..errors import ReproError

MARKED = re.compile(r"(?P<open><!-- (?P<name>[a-z0-9_-]+):(?P<scale>smoke|cpu|paper) -->\n)"
                    r"(?P<body>.*?)(?P<close><!-- /(?P=name):(?P=scale) -->)", re.S)
COMPACT = {"Method": "Method", "Clean": "Clean", "PGD": "PGD-20", "AA": "AA",
           "Cost (PFLOP)": "Cost (PFLOP)"}  # Table 1 at a glance: rendered column -> shown as
# the README's paired verdict rows: AFT at the paper's recipe and at its validation-tuned one
PAIRED_AFT = ("AFT − PGD AT", "AFT − PGD AT (early stop)", "AFT (tuned) − PGD AT",
              "AFT (tuned) − PGD AT (early stop)")
PAIRED_COLUMNS = ("Comparison", "Metric", "Mean difference (pp)", "95% interval (pp)",
                  "FLOPs ratio", "FLOPs ratio incl. pre-training")
BENCH_COLUMNS = {"method": "method", "arch": "arch", "batch": "batch", "precision": "precision",
                 "images_per_s": "img/s", "seconds_per_epoch": "s/epoch",
                 "gflop_per_image": "GFLOP/img", "mfu_measured": "MFU vs measured GEMM",
                 "wgrad_in_attack": "wgrad in attack",
                 "speedup_vs_baseline_loop": "vs backward()-in-attack loop"}


def doc_files(root: str | Path) -> list[Path]:
    """README.md and docs/*.md under root: every file whose blocks `aggregate` keeps."""
    root = Path(root)
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def _not_rendered(path: Path, results_dir: str | Path) -> str:
    shown = Path("results") / path.relative_to(results_dir)  # the same line for any store
    return (f"_Not rendered yet: `{shown.as_posix()}` does not exist (train its runs, then "
            "`python -m paper_repro aggregate`)._\n")


def _table_rows(path: Path) -> list[list[str]]:
    """The cells of the markdown table in a rendered file (header first, separator dropped)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return [r for i, r in enumerate(rows) if i != 1]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(":--" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _pick(path: Path, columns: dict[str, str] | tuple[str, ...],
          keep: Callable[[dict[str, str]], bool] = lambda row: True) -> str:
    """Some columns (and rows) of a rendered table, cells verbatim."""
    header, *rows = _table_rows(path)
    columns = columns if isinstance(columns, dict) else {c: c for c in columns}
    missing = [c for c in columns if c not in header]
    if missing:
        raise ReproError(f"{path}: no column {', '.join(missing)}; render it again (aggregate)")
    dicts = [dict(zip(header, r)) for r in rows]
    return _markdown(list(columns.values()),
                     [[d[c] for c in columns] for d in dicts if keep(d)])


def _table(name: str, tables: Path) -> str:
    path = tables / f"{name}.md"
    return "".join(ln + "\n" for ln in path.read_text().splitlines() if ln.startswith("|"))


def _compact(tables: Path) -> str:
    return _pick(tables / "table1.md", COMPACT)


def _paired_aft(tables: Path) -> str:
    return _pick(tables / "table1_paired.md", PAIRED_COLUMNS,
                 lambda row: row["Comparison"] in PAIRED_AFT)


def _bench(bench_file: Path) -> str:
    entries = json.loads(bench_file.read_text())["entries"]
    def cell(value: object) -> str:
        return "" if value is None else ("yes" if value is True else "no" if value is False
                                         else str(value))
    rows = [[cell(e.get(k)) for k in BENCH_COLUMNS] for e in
            sorted(entries, key=lambda e: (e["arch"], e["method"], e["batch"]))]
    return f"Device: {json.loads(bench_file.read_text())['device']}.\n\n" + _markdown(
        list(BENCH_COLUMNS.values()), rows)


VIEWS: dict[str, tuple[str, Callable[[Path], str]]] = {  # name -> (file it reads, renderer)
    "table1-compact": ("table1.md", _compact),
    "paired-aft": ("table1_paired.md", _paired_aft),
}


def render_block(name: str, scale: str, results_dir: str | Path = "results") -> str:
    """The body of the block <!-- name:scale -->, from the rendered files of the store."""
    from ..experiment import list_experiments

    tables = Path(results_dir) / "tables" / scale
    if name == "bench":
        path = Path(results_dir) / "bench" / f"{scale}.json"
        return _bench(path) if path.is_file() else _not_rendered(path, results_dir)
    if name in VIEWS:
        source, renderer = VIEWS[name]
        return (renderer(tables) if (tables / source).is_file()
                else _not_rendered(tables / source, results_dir))
    if name.removesuffix("_paired").removesuffix("_tuning") not in list_experiments():
        raise ReproError(f"<!-- {name}:{scale} -->: no such table (an experiment, "
                         f"<experiment>_paired, <experiment>_tuning, or one of "
                         f"{', '.join([*VIEWS, 'bench'])})")
    path = tables / f"{name}.md"
    return _table(name, tables) if path.is_file() else _not_rendered(path, results_dir)


def rewrite(text: str, results_dir: str | Path = "results") -> str:
    """`text` with every marked block's body replaced by what the store renders."""
    def body(m: re.Match[str]) -> str:
        block = render_block(m["name"], m["scale"], results_dir)
        return m["open"] + "\n" + block + "\n" + m["close"]
    return MARKED.sub(body, text)


def update_docs(root: str | Path, results_dir: str | Path | None = None) -> list[Path]:
    """Rewrite the marked blocks of README.md and docs/*.md under root (the store: root/results);
    only files whose content changes are written. Returns those."""
    from ..store.files import atomic_write_text

    results_dir = Path(results_dir) if results_dir is not None else Path(root) / "results"
    changed = []
    for path in doc_files(root):
        text = path.read_text()
        new = rewrite(text, results_dir)
        if new != text:
            atomic_write_text(path, new)
            changed.append(path)
    return changed
