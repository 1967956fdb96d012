"""`python -m paper_repro`: run, finetune, sweep, table, aggregate, verify, status, export,
bench, gpucheck.

Every user error (bad flag value, missing data, unsafe checkpoint...) ends as one line on
stderr and exit status 2; nothing already in the results store is overwritten. A run of the
store whose record or config cannot be read is not an error for the commands that only read
the store (table, aggregate, status): each such run gets one `warning:` line on stderr and
shows as "unreadable", and everything else renders.

The parser is one table of flags (like fast_adversarial's get_args) and every subcommand's
handler is a few lines that call into the package. Over 400 lines because it has eleven
commands and the flag-to-config glue they share (experiment rows x seeds, an ad-hoc run's
stand-in, --select, the pool's slots, the SLURM flags it declares so that building the
parser never imports the plug-in); the work itself is elsewhere (config.py and
training/methods.resolve_row resolve, orchestration/pool.py trains, report/ renders and
verifies), so no cut leaves a room with one purpose.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ReproError
from .perf import gpus

FRESH_DIR = "results-fresh"  # where `./reproduce.sh TABLE --fresh` re-runs (git-ignored)

SLURM_LAUNCHER = "slurm.launcher"  # the SLURM plug-in, imported by name when a command needs it


def _slurm() -> Any:
    """The SLURM launcher (slurm/launcher.py): a plug-in that imports core, so core reaches it
    by name, only for --slurm and `status`."""
    return importlib.import_module(SLURM_LAUNCHER)


SLURM_FLAGS: list[tuple[str, str, Any, str, str]] = [
    ("--partition", "partition", str, "P", "SLURM partition"),
    ("--gpus-per-job", "gpus_per_job", int, "N", "GPUs per job (--gpus-per-node); N > 1 "
                                                 "trains data-parallel, one task per GPU"),
    ("--tasks-per-node", "tasks_per_node", int, "N", "data-parallel processes per job (default: "
                                                     "one per GPU; e.g. 2 on CPUs, gloo)"),
    ("--cpus-per-task", "cpus_per_task", int, "C", "CPU cores per job (also torch's threads)"),
    ("--mem", "mem", float, "GB", "memory per job in GB"),
    ("--time", "time", str, "HH:MM:SS", "wall-time limit per job (default 24:00:00); a job "
                                         "that hits it is requeued and resumes"),
    ("--account", "account", str, "A", "SLURM account to charge"),
    ("--qos", "qos", str, "Q", "SLURM quality of service"),
    ("--array-parallelism", "array_parallelism", int, "K", "at most K jobs of an array at once"),
]


def _add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's SLURM flags: part of the command line, so the parser needs no plug-in;
    slurm/launcher.py reads them (`options_from_args`)."""
    g = parser.add_argument_group("SLURM (submit job arrays instead of training here)")
    g.add_argument("--slurm", action="store_true",
                   help="submit every run as a SLURM job array through submitit and return "
                        "(see `status`); runs already done or queued are skipped")
    for flag, dest, typ, metavar, help_ in SLURM_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, default=None, metavar=metavar, help=help_)
    g.add_argument("--sbatch-arg", dest="sbatch_arg", action="append", default=[],
                   metavar="KEY=VALUE", help="any other sbatch option, e.g. constraint=a100 "
                                             "(repeatable; KEY alone for a flag)")


# flag -> config key; each flag's value goes through the same validation as TOML values
_OVERRIDE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--method", "method", str, "training method (see --list)"),
    ("--dataset", "dataset", str, "cifar10, cifar100, fashion-mnist"),
    ("--data-root", "data_root", str, "dataset folder (default $REPRO_DATA, then ./data)"),
    ("--arch", "arch", str, "model name (see --list)"),
    ("--epochs", "epochs", int, "epochs (data passes)"),
    ("--batch-size", "batch_size", int, "minibatch size"),
    ("--lr", "lr", float, "base / peak learning rate"),
    ("--eps", "eps", str, "L∞ radius in pixels, e.g. 8/255 or 0.1"),
    ("--train-subset", "train_subset", int, "use N training images"),
    ("--eval-n", "eval_n", int, "test images for the final PGD (default all)"),
    ("--aa-n", "aa_n", int, "AutoAttack on N of those images (0: off; default the experiment's)"),
    ("--init", "init", str, "start from weights: torchvision:<name>[:<weights>], "
     "timm:<name>[:<file>], run:<run-path> or a checkpoint file"),
    ("--max-steps", "max_steps", int, "stop after N optimiser steps"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:1"),
    ("--precision", "precision", str, "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16"),
    ("--results-dir", "results_dir", str, "results store (default results)"),
]


def _add_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config overrides (applied last)")
    for flag, _key, typ, help_ in _OVERRIDE_FLAGS:
        g.add_argument(flag, type=typ, default=None, help=help_)
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-reproducible mode (resume gives identical results)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set schedule_args.peak_at=0.2 (repeatable)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .config import _deep_merge, parse_override

    out: dict[str, Any] = {}
    for flag, key, _typ, _help in _OVERRIDE_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None and key != "method":
            out[key] = value
    for flag in ("deterministic", "compile"):
        if getattr(args, flag, None):
            out[flag] = True
    for text in args.set:
        key, value = parse_override(text)
        out = _deep_merge(out, {key: value})
    return out


def _default_scale() -> str:
    import torch

    if torch.cuda.is_available():
        return "paper"
    print("no GPU found: using the cpu scale (Fashion-MNIST stand-ins); --scale paper to "
          "force the paper's setup")
    return "cpu"


def _recipe(method: str) -> dict[str, Any]:
    from .training.methods import get_method

    return get_method(method).recipe


def cmd_run(args: argparse.Namespace) -> int:
    select = getattr(args, "select", "final")
    if args.seeds is None:  # one run unless asked; an experiment's `seeds` is for its sweeps
        args.seeds = 1
    if args.experiment:
        args.rows = args.row
        configs = _experiment_configs(args, args.experiment, args.scale or _default_scale())
    else:
        method = args.method or "natural"
        scale = args.scale or "cpu"
        # --scale smoke|cpu asks for that scale's stand-in; without it, with a --dataset of
        # one's own, and for finetune (the user's model): the method's recipe and the flags
        own = not getattr(args, "standin", True) or args.dataset is not None
        standin = args.scale if args.scale and not own else "paper"
        configs = [_adhoc_config(method, standin, args.name or method, seed, _overrides(args),
                                 scale=scale)
                   for seed in _seeds(args)]
    _check_select(configs, select)
    _train(configs, args, select).raise_if_failed()
    return 0


def _adhoc_config(method: str, standin: str, name: str, seed: int, overrides: dict[str, Any],
                  scale: str):
    """An ad-hoc run: at smoke and cpu (`standin`) the stand-in of the first experiment row
    that trains `method` (table1 first: its dataset, network, images, ε and scaled epochs),
    else ("paper") the method's own recipe. The command line's flags win; an --arch of its own
    drops the stand-in network's options. `scale` labels the run."""
    from .config import build_config
    from .experiment import list_experiments, load_experiment, unsupported_reason
    from .training.methods import resolve_row

    recipe = _recipe(method)  # an unknown method is one line before anything else
    if standin != "paper":
        names = ["table1"] + [n for n in list_experiments() if n != "table1"]
        for exp in map(load_experiment, names):
            row = next((r["id"] for r in exp.rows if r.get("method") == method
                        and "view_of" not in r and not r.get("extra_data")
                        and not unsupported_reason(exp, r["id"], scale)), None)
            if row is not None:
                cfg = resolve_row(exp, row, scale, seed=seed, overrides=overrides)
                if "arch" in overrides and "model_args" not in overrides:
                    cfg = dataclasses.replace(cfg, model_args={})
                return dataclasses.replace(cfg, experiment="adhoc", row=name)
        raise ReproError(f"no {scale}-scale stand-in for method '{method}' (no experiment row "
                         "trains it): give its setup with flags (--dataset, --arch, --epochs...) "
                         "and --scale paper")
    return build_config(("method recipe", recipe), ("command line", overrides),
                        experiment="adhoc", row=name, scale=scale, seed=seed, method=method)


def _run_directory(cfg: Any) -> Any:
    from .store.layout import run_dir

    return run_dir(cfg.results_dir, cfg.run_path)


def _check_resumable(configs: list) -> None:
    """--resume: something of each run (its folder, or a prerequisite's) must have started."""
    from .training.pipeline import plan
    from .training.runner import was_started

    for cfg in configs:
        if not any(was_started(run.directory) for run in plan([cfg]).values()):
            raise ReproError(f"--resume: nothing to resume in {_run_directory(cfg)} (the run "
                             "was never started); leave out --resume to start it")


def _print_local_plan(configs: list, slots: Any) -> None:
    """Before a local sweep: how many runs, and where a cost is known, how long (plan)."""
    from .perf.plan import local_estimate

    line = local_estimate(configs, slots)
    if line:
        print(line)


def _train(configs: list, args: argparse.Namespace, select: str) -> Any:
    """Train `configs` (and what they need) in the local pool, then one line per config;
    returns the pool's outcome (failed and blocked runs are the caller's to raise)."""
    from .orchestration import pool

    if args.resume:
        _check_resumable(configs)
    slots = pool.Slots.resolve(args.jobs, args.gpus, args.gpus_per_run)
    _print_local_plan(configs, slots)
    outcome = pool.train_all(configs, slots)
    for cfg in configs:
        record = outcome.records.get(_run_directory(cfg))
        if record:
            _report(record, select)
    return outcome


def _check_select(configs: list, select: str) -> None:
    """--select best shows a run's best epoch: refuse, before training, runs that keep none."""
    for cfg in configs:
        if select == "best" and cfg.val_n == 0:
            raise ReproError(f"--select best: {cfg.run_path} has no validation split (val_n = "
                             "0), so it keeps no best epoch; add --set val_n=N or use "
                             "--select final")


def cmd_finetune(args: argparse.Namespace) -> int:
    """AFT on any pre-trained model (`--init` required)."""
    from .models.pretrained import FORMS, implied_arch

    if not args.init:
        raise ReproError(f"finetune needs --init ({FORMS})")
    args.arch = args.arch or implied_arch(args.init)  # torchvision:/timm: bring their network
    args.method = "aft"
    args.experiment = None
    args.standin = False
    return cmd_run(args)


def _experiment_configs(args: argparse.Namespace, name: str, scale: str) -> list:
    """The configs a sweep of experiment `name` runs: its rows (or --rows) x seeds."""
    from .experiment import load_experiment, unsupported_reason
    from .training.methods import resolve_row

    exp = load_experiment(name)
    rows = args.rows.split(",") if getattr(args, "rows", None) else exp.row_ids
    overrides = _overrides(args)
    configs = []
    # a view row shows another row's run: it means that run, once, never a second training
    sources: dict[tuple[str, str], str] = {}
    for r in rows:
        sources.setdefault(exp.source(r), r)
    for row_id in sources.values():
        reason = unsupported_reason(exp, row_id, scale)
        if reason and not getattr(args, "rows", None):  # named explicitly: resolve_row says why
            print(f"skipping {name}/{row_id}: not supported at scale {scale} ({reason})",
                  file=sys.stderr)
            continue
        configs += [resolve_row(exp, row_id, scale, seed=seed, overrides=overrides,
                                controlled_arch=getattr(args, "controlled", None))
                    for seed in _seeds(args, exp.seeds.get(scale, 1))]
    return configs


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run every row (x seeds) of one or more experiments in the local pool, then render their
    tables and figures; with --slurm, submit them as job arrays instead and return."""
    options_from_args = _slurm().options_from_args

    if args.rows and len(args.experiments) > 1:
        raise ReproError("--rows applies to one experiment; name one, or leave out --rows")
    slurm_options = options_from_args(args)  # None without --slurm
    if slurm_options is not None:
        submit_sweep = _slurm().submit_sweep

        if not args.scale:
            print("--slurm without --scale: using the paper scale")
        configs = _sweep_configs(args, args.scale or "paper")
        gpu = args.plan_gpu or ("h100" if (args.scale or "paper") == "paper" else "none")
        if gpu != "none":  # what it will cost, before it is submitted
            from .perf.plan import plan_costs, render

            print(render(plan_costs(configs, gpu), gpu, slurm_options.gpus_per_job or 1))
        job_ids = submit_sweep(configs, slurm_options)
        print(f"submitted {len(job_ids)} jobs: {' '.join(job_ids)}" if job_ids else
              "nothing to submit: every run is done, queued or running")
        print(f"follow them with: python -m paper_repro status {' '.join(args.experiments)} "
              f"--scale {args.scale or 'paper'}")
        return 0
    args.scale = args.scale or _default_scale()
    configs = _sweep_configs(args, args.scale)  # all validated first
    _check_select(configs, args.select)
    outcome = _train(configs, args, args.select)
    _render_sweep(args)  # what is done is rendered, even when some runs failed
    outcome.raise_if_failed()
    return 0


def _sweep_configs(args: argparse.Namespace, scale: str) -> list:
    return [cfg for name in args.experiments for cfg in _experiment_configs(args, name, scale)]


def _render_sweep(args: argparse.Namespace) -> None:
    from .experiment import load_experiment
    from .report.figures import write_figures

    tables = [n for n in args.experiments if load_experiment(n).kind != "figure"]
    if len(tables) < len(args.experiments):
        for path in write_figures(args.scale, results_dir=args.results_dir or "results"):
            print(f"wrote {path}")
    if tables:
        cmd_table(argparse.Namespace(**{**vars(args), "experiments": tables}))


def _warn_unreadable(results_dir: str, scale: str,
                     experiments: Sequence[str] | None = None) -> tuple[int, int]:
    """One `warning:` line on stderr per run (of `experiments`, or all, pre-trainings included)
    whose record or config cannot be read. Returns (unreadable runs, readable runs)."""
    from .store import query

    frame = query.load(results_dir, scale=scale, include_pretrain=True)
    if experiments is not None and not frame.empty:
        frame = frame[frame["experiment"].isin(list(experiments))]
    problems = query.problems(frame)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return len(problems), len(frame) - len(problems)


def cmd_table(args: argparse.Namespace) -> int:
    from .report.tables import write_table
    from .store.layout import require_store

    require_store(args.results_dir or "results")
    scale = args.scale or _default_scale()
    _warn_unreadable(args.results_dir or "results", scale, args.experiments)
    for name in args.experiments:
        paths = write_table(name, scale, results_dir=args.results_dir or "results",
                            controlled_arch=getattr(args, "controlled", None),
                            select=args.select)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What a sweep will cost on a GPU, before it runs (paper_repro/perf/plan.py)."""
    from .perf.plan import plan_costs, render

    if args.gpus_per_job < 1:
        raise ReproError("--gpus-per-job must be >= 1")
    configs = _experiment_configs(args, args.experiment, args.scale)
    print(render(plan_costs(configs, args.gpu, mfu=args.mfu), args.gpu, args.gpus_per_job))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Each run's state (done, running, queued, failed, not submitted, unreadable) from store
    and scheduler."""
    format_status = _slurm().format_status

    from .store.layout import require_store

    require_store(args.results_dir or "results")
    scale = args.scale or _default_scale()
    for name in args.experiments:
        print(f"{name} ({scale} scale)")
        print(format_status(_status_rows(_experiment_configs(args, name, scale))))
    return 0


def _status_rows(configs: list) -> list[dict[str, Any]]:
    """The launcher's status rows; where a run's record or config cannot be read, that run is a
    row of its own ("unreadable", with a warning) and every other run is still shown."""
    status = _slurm().status

    from .store.layout import UnreadableRunError

    try:
        return status(configs)
    except UnreadableRunError:
        pass  # ask run by run, so that one unreadable run hides no other
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        try:
            found = status([cfg])
        except UnreadableRunError as e:
            print(f"warning: {e}", file=sys.stderr)
            found = [{"run": e.run_path, "state": "unreadable", "job_id": "", "log": "",
                      "detail": f"{e.path.name}: {e.reason}"}]
            if e.run_path != cfg.run_path:  # a pre-training it needs is the unreadable one
                found.append({"run": cfg.run_path, "state": "unknown", "job_id": "", "log": "",
                              "detail": f"needs {e.run_path}, which cannot be read"})
        rows += [r for r in found if r["run"] not in {seen["run"] for seen in rows}]
    return rows


def cmd_aggregate(args: argparse.Namespace) -> int:
    """Rebuild every table and figure from the store alone (no training). Unreadable runs are
    warned about and shown as such; the exit status is non-zero only with --strict, or when
    nothing at all could be rendered."""
    from .report.figures import write_figures
    from .report.tables import tables_with_results, write_table
    from .store.layout import require_store, runs_root

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
        from .report.docs import update_docs
        for path in update_docs(Path(results_dir).resolve().parent):
            print(f"wrote {path}")
    if args.strict and unreadable:
        raise ReproError(f"--strict: {unreadable} run(s) could not be read (warnings above); "
                         "everything else was rendered")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """A re-run store against the committed one (at paper scale: the paper), cell by cell
    (report/verify.py). A report: exit 0 whatever the verdicts; 2 only when nothing compares."""
    from .report.verify import write_verify

    scale = args.scale or _default_scale()
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

    from .export import INFO, export_model
    from .store.layout import require_store

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


def _seeds(args: argparse.Namespace, default: int = 1) -> list[int]:
    """--seed K --seeds N: seeds K..K+N-1; without --seeds, the experiment's own count for
    the scale (`seeds = { cpu = 3 }` in its file), else 1."""
    seeds = default if args.seeds is None else args.seeds
    if seeds < 1:
        raise ReproError("--seeds must be >= 1")
    return list(range(args.seed, args.seed + seeds))


def _report(record: dict[str, Any], select: str = "final") -> None:
    """One line per run: its final model's numbers, or with --select best its best epoch's."""
    p = "best_" if select == "best" else ""
    at = f" (best epoch {record.get('best_epoch')})" if p else ""
    print(f"{record.get('run_path')}{at}: clean {record.get(p + 'clean_acc', float('nan')):.2f}% "
          f"PGD-{record.get('eval_steps')} {record.get(p + 'pgd_acc', float('nan')):.2f}% "
          + (f"AA {record[p + 'aa_acc']:.2f}% " if record.get(p + "aa_acc") is not None else "")
          + f"train {record.get('train_minutes', 0):.2f} min [{record.get('status')}]"
          + (f" checks: {record[p + 'checks']}" if p + "checks" in record else ""))


def _add_select(p: argparse.ArgumentParser) -> None:
    p.add_argument("--select", choices=["final", "best"], default="final",
                   help="which model of each run is shown: the final one, or its best epoch's "
                        "(highest validation PGD; runs with val_n > 0); not part of the config")


def _add_pool(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("local pool (paper_repro/orchestration/pool.py)")
    g.add_argument("--jobs", type=int, default=None, metavar="K",
                   help="train K runs at once, each after the runs it needs (default: one per "
                        "GPU, else one per CPU core, each with one thread; $REPRO_JOBS)")
    g.add_argument("--gpus", default=None, metavar="all|0,1,3",
                   help="the GPUs the pool hands out, one run per GPU (or --gpus-per-run)")
    g.add_argument("--gpus-per-run", type=int, default=1, metavar="N",
                   help="GPUs each run takes (data parallel over N processes)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m paper_repro",
                     description="Adversarial Fine-Tuning reproduction suite")
    parser.add_argument("--list", action="store_true",
                        help="list methods, models, datasets, schedules and experiments")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def runlike(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default=None,
                       help="default: paper with a GPU, else cpu")
        p.add_argument("--seed", type=int, default=0, help="first seed")
        p.add_argument("--seeds", type=int, default=None,
                       help="number of seeds (runs per row; default: the experiment file's "
                            "`seeds` for the scale, else 1)")
        p.add_argument("--resume", action="store_true",
                       help="require a checkpoint to continue from (runs resume anyway)")
        if name != "status":
            _add_select(p)
        if name in ("run", "finetune", "sweep"):
            _add_pool(p)
        _add_overrides(p)
        return p

    p = runlike("run", "train and evaluate one run, or rows of an experiment")
    p.add_argument("--experiment", help="experiment file name (e.g. table1)")
    p.add_argument("--row", help="one row of the experiment (default: all)")
    p.add_argument("--controlled", metavar="ARCH",
                   help="run the rows on this architecture instead of their reference ones")
    p.add_argument("--name", help="row name of an ad-hoc run (default: the method)")
    p.set_defaults(func=cmd_run)

    p = runlike("finetune", "adversarially fine-tune a pre-trained model (AFT)")
    p.add_argument("--name", default="finetune", help="row name in the store")
    p.set_defaults(func=cmd_finetune)

    p = runlike("sweep", "run all rows of experiments in the local pool (or on SLURM), "
                         "then render their tables and figures")
    p.add_argument("experiments", nargs="+", metavar="experiment",
                   help="experiment names, e.g. table1 (several share one pool)")
    p.add_argument("--rows", help="comma-separated subset of rows")
    p.add_argument("--controlled", metavar="ARCH",
                   help="run every row on this architecture (stored as <exp>-controlled-ARCH)")
    p.add_argument("--plan-gpu", metavar="GPU",
                   help="with --slurm: print the sweep's cost on this GPU (see `plan`) before "
                        "submitting (default: h100 at paper scale; 'none' to skip)")
    _add_slurm_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = runlike("plan", "optimiser steps, FLOPs and GPU-hours of every run of a sweep")
    p.add_argument("experiment", help="experiment name, e.g. table1")
    p.add_argument("--rows", help="comma-separated subset of rows")
    p.add_argument("--controlled", metavar="ARCH", help="the controlled variant on ARCH")
    p.add_argument("--gpu", required=True,
                   help=f"one of {', '.join(gpus.names())} (gpus.py: the peaks bench uses)")
    p.add_argument("--gpus-per-job", type=int, default=1,
                   help="GPUs per run (data parallel): divides a job's wall time")
    p.add_argument("--mfu", type=float, help="model FLOP utilisation to assume (default: "
                   "bench's measurement for that GPU, else a default per architecture)")
    p.set_defaults(func=cmd_plan, scale="paper")

    p = runlike("status", "each run's state: done, running, queued, failed (with its log) or "
                          "not submitted")
    p.add_argument("experiments", nargs="+", help="e.g. table1")
    p.add_argument("--rows", help="comma-separated subset of rows")
    p.add_argument("--controlled", metavar="ARCH", help="the controlled variant on ARCH")
    p.set_defaults(func=cmd_status)

    _add_store_commands(sub)
    _add_device_commands(sub)
    return parser


def _add_store_commands(sub: Any) -> None:
    """The commands that read the results store and train nothing."""
    p = sub.add_parser("table", help="render tables from the results store")
    p.add_argument("experiments", nargs="+", help="e.g. table1")
    _add_select(p)
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default=None)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--controlled", metavar="ARCH", help="the controlled variant on ARCH")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("aggregate", help="rebuild every table and figure from results/ alone")
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default=None)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero when a run's record or config cannot be read (default: "
                        "warn, show its cell as unreadable and render the rest)")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("verify", help="did it reproduce? a re-run store (./reproduce.sh TABLE "
                       "--fresh) against the committed results, or the paper at paper scale")
    p.add_argument("experiments", nargs="+", help="e.g. table1")
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default=None,
                   help="default: paper with a GPU, else cpu")
    p.add_argument("--results-dir", default=None,
                   help=f"the re-run store (default {FRESH_DIR}); the report is written there")
    p.add_argument("--against", default="results",
                   help="the committed store to compare with (default results; unused at paper "
                        "scale, where the reference is results/paper/*.csv)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write a run's model as model.safetensors, "
                                      "model_info.json and a README.md model card")
    p.add_argument("run", help="run path in the store, e.g. cpu/table1/aft/seed0")
    p.add_argument("--out", required=True, help="folder to create (absent or empty)")
    p.add_argument("--select", choices=["final", "best"], default="final",
                   help="final: checkpoint.pt; best: the run's best.pt, where it kept one")
    p.add_argument("--results-dir", default=None, help="results store (default results)")
    p.set_defaults(func=cmd_export)


def _add_device_commands(sub: Any) -> None:
    """The commands that measure the machine (synthetic data, nothing stored in runs/)."""
    from .perf import bench
    p = sub.add_parser("bench", help="images/s, FLOPs and MFU of one method's training step")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)

    from .perf import gpucheck
    p = sub.add_parser("gpucheck", help="the one GPU check (<= 8 min): bench of every Table 1 "
                       "pair eager and compiled, a PGD-10 epoch, bf16 vs fp32, Table 1's hours")
    gpucheck.add_arguments(p)
    p.set_defaults(func=gpucheck.main)


def _print_lists() -> None:
    from .experiment import list_experiments
    from .data import list_datasets
    from .training.methods import list_methods
    from .models import list_models
    from .training.schedules import SCHEDULES

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
        return args.func(args)
    except ReproError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is checkpointed; rerun to resume",
              file=sys.stderr)
        return 130
