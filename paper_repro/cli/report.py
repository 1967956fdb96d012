"""The commands that read the results store and train nothing: table, aggregate, verify,
export. A run whose record or config cannot be read is not an error here: it gets one
`warning:` line on stderr, shows as "unreadable", and everything else renders.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import ReproError
from .parser import FRESH_DIR, default_scale

def _warn_unreadable(results_dir: str, scale: str,
                     experiments: Sequence[str] | None = None) -> tuple[int, int]:
    """One `warning:` line on stderr per run (of `experiments`, or all, pre-trainings included)
    whose record or config cannot be read. Returns (unreadable runs, readable runs)."""
    from ..store import query

    frame = query.load(results_dir, scale=scale, include_pretrain=True)
    if experiments is not None and not frame.empty:
        frame = frame[frame["experiment"].isin(list(experiments))]
    problems = query.problems(frame)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return len(problems), len(frame) - len(problems)


def cmd_table(args: argparse.Namespace) -> int:
    from ..report.tables import write_table
    from ..store.layout import require_store

    require_store(args.results_dir or "results")
    scale = args.scale or default_scale()
    _warn_unreadable(args.results_dir or "results", scale, args.experiments)
    for name in args.experiments:
        paths = write_table(name, scale, results_dir=args.results_dir or "results",
                            controlled_arch=getattr(args, "controlled", None),
                            select=args.select)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    """Rebuild every table and figure from the store alone (no training). Unreadable runs are
    warned about and shown as such; the exit status is non-zero only with --strict, or when
    nothing at all could be rendered."""
    from ..report.figures import write_figures
    from ..report.tables import tables_with_results, write_table
    from ..store.layout import require_store, runs_root

    results_dir = args.results_dir or "results"
    require_store(results_dir)
    scales = [args.scale] if args.scale else ["smoke", "cpu", "paper"]
    written = unreadable = 0
    for scale in scales:
        bad, readable = _warn_unreadable(results_dir, scale)
        unreadable += bad
        if not readable:
            continue
        for name in tables_with_results(scale, results_dir):
            paths = write_table(name, scale, results_dir=results_dir)
            print(f"wrote {paths['md']}")
            written += 1
        for path in write_figures(scale, results_dir=results_dir):
            print(f"wrote {path}")
            written += 1
    if not written:
        where = f" at scale {args.scale}" if args.scale else ""
        raise ReproError(f"nothing to render: no readable run in {runs_root(results_dir)}{where}")
    if args.results_dir in (None, "results"):  # the committed store: its README/docs blocks too
        from ..report.docs import update_docs
        for path in update_docs(Path(results_dir).resolve().parent):
            print(f"wrote {path}")
    if args.strict and unreadable:
        raise ReproError(f"--strict: {unreadable} run(s) could not be read (warnings above); "
                         "everything else was rendered")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """A re-run store against the committed one (at paper scale: the paper), cell by cell
    (report/verify.py). A report: exit 0 whatever the verdicts; 2 only when nothing compares."""
    from ..report.verify import write_verify

    scale = args.scale or default_scale()
    fresh = args.results_dir or FRESH_DIR
    if Path(fresh).is_dir():  # a missing store is verify's one-line error, nothing created
        _warn_unreadable(fresh, scale, args.experiments)
    for name in args.experiments:
        paths = write_verify(name, scale, fresh, against=args.against)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run's model as model.safetensors + model_info.json + README.md (a model card)."""
    import json

    from ..export import INFO, export_model
    from ..store.layout import require_store

    from pathlib import Path

    if not Path(args.run).exists():  # a run path in the store, not a folder of its own
        require_store(args.results_dir or "results")
    out = export_model(args.run, args.out, select=args.select,
                       results_dir=args.results_dir or "results")
    info = json.loads((out / INFO).read_text())

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}%"

    print(f"wrote {out}: {info['name']}; clean {pct(info['clean_acc'])}, PGD-20 "
          f"{pct(info['pgd20_acc'])}, AA {pct(info['autoattack_acc'])}; "
          f"sha256 {info['weights']['sha256'][:16]}...")
    return 0
