"""`python -m paper_repro`: run, finetune, sweep, plan, status, table, aggregate, verify,
export, bench, gpucheck.

Every user error (bad flag value, missing data, unsafe checkpoint...) ends as one line on
stderr and exit status 2; nothing already in the results store is overwritten. A run of the
store whose record or config cannot be read is not an error for the commands that only read
the store (table, aggregate, status): each such run gets one `warning:` line on stderr and
shows as "unreadable", and everything else renders.

parser.py holds the flags and subcommands; train.py the commands that train, plan and follow
runs; report.py those that read the store. Each handler is a few lines that call into the
package; `COMMANDS` maps each subcommand to its handler.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ..errors import ReproError
from .parser import build_parser
from .report import cmd_aggregate, cmd_export, cmd_table, cmd_verify
from .train import cmd_finetune, cmd_plan, cmd_run, cmd_status, cmd_sweep


def cmd_bench(args: argparse.Namespace) -> int:
    from ..perf import bench

    return bench.main(args)


def cmd_gpucheck(args: argparse.Namespace) -> int:
    from ..perf import gpucheck

    return gpucheck.main(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "finetune": cmd_finetune, "sweep": cmd_sweep, "plan": cmd_plan,
    "status": cmd_status, "table": cmd_table, "aggregate": cmd_aggregate, "verify": cmd_verify,
    "export": cmd_export, "bench": cmd_bench, "gpucheck": cmd_gpucheck}


def _print_lists() -> None:
    from ..experiment import list_experiments
    from ..data import list_datasets
    from ..training.methods import list_methods
    from ..models import list_models
    from ..training.schedules import SCHEDULES

    print("methods:    ", ", ".join(list_methods()))
    print("models:     ", ", ".join(list_models()))
    print("datasets:   ", ", ".join(list_datasets()))
    print("schedules:  ", ", ".join(sorted(SCHEDULES)))
    print("experiments:", ", ".join(list_experiments()))
    print("--init:      torchvision:<name>[:<weights>], timm:<name>[:<file>], run:<run-path>, "
          "or a checkpoint file (state dicts only)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            _print_lists()
            return 0
        if not args.command:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except ReproError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is checkpointed; rerun to resume",
              file=sys.stderr)
        return 130
