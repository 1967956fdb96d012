"""The commands that train (run, finetune, sweep) and those that plan or follow a sweep (plan,
status), with the flag-to-config glue they share: experiment rows x seeds, an ad-hoc run's
stand-in, --resume and --select checks, the pool's slots. The work itself is elsewhere
(experiment.py and training/methods.resolve_row resolve, orchestration/pool.py trains,
slurm/launcher.py submits).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from ..errors import ReproError
from .parser import OVERRIDE_FLAGS, SLURM_LAUNCHER, default_scale
from .report import cmd_table

def _slurm() -> Any:
    """The SLURM launcher (slurm/launcher.py): a plug-in that imports core, so core reaches it
    by name, only for --slurm and `status`."""
    return importlib.import_module(SLURM_LAUNCHER)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import _deep_merge, parse_override

    out: dict[str, Any] = {}
    for flag, key, _typ, _help in OVERRIDE_FLAGS:
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


def _recipe(method: str) -> dict[str, Any]:
    from ..training.methods import get_method

    return get_method(method).recipe


def cmd_run(args: argparse.Namespace) -> int:
    select = getattr(args, "select", "final")
    if args.seeds is None:  # one run unless asked; an experiment's `seeds` is for its sweeps
        args.seeds = 1
    if args.experiment:
        args.rows = args.row
        configs = _experiment_configs(args, args.experiment, args.scale or default_scale())
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
    from ..config import build_config
    from ..experiment import list_experiments, load_experiment, unsupported_reason
    from ..training.methods import resolve_row

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
    from ..store.layout import run_dir

    return run_dir(cfg.results_dir, cfg.run_path)


def _check_resumable(configs: list) -> None:
    """--resume: something of each run (its folder, or a prerequisite's) must have started."""
    from ..training.pipeline import plan
    from ..training.runner import was_started

    for cfg in configs:
        if not any(was_started(run.directory) for run in plan([cfg]).values()):
            raise ReproError(f"--resume: nothing to resume in {_run_directory(cfg)} (the run "
                             "was never started); leave out --resume to start it")


def _print_local_plan(configs: list, slots: Any) -> None:
    """Before a local sweep: how many runs, and where a cost is known, how long (plan)."""
    from ..perf.plan import local_estimate

    line = local_estimate(configs, slots)
    if line:
        print(line)


def _train(configs: list, args: argparse.Namespace, select: str) -> Any:
    """Train `configs` (and what they need) in the local pool, then one line per config;
    returns the pool's outcome (failed and blocked runs are the caller's to raise)."""
    from ..orchestration import pool

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
    from ..models.pretrained import FORMS, implied_arch

    if not args.init:
        raise ReproError(f"finetune needs --init ({FORMS})")
    args.arch = args.arch or implied_arch(args.init)  # torchvision:/timm: bring their network
    args.method = "aft"
    args.experiment = None
    args.standin = False
    return cmd_run(args)


def _experiment_configs(args: argparse.Namespace, name: str, scale: str) -> list:
    """The configs a sweep of experiment `name` runs: its rows (or --rows) x seeds."""
    from ..experiment import load_experiment, unsupported_reason
    from ..training.methods import resolve_row

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
            from ..perf.plan import plan_costs, render

            print(render(plan_costs(configs, gpu), gpu, slurm_options.gpus_per_job or 1))
        job_ids = submit_sweep(configs, slurm_options)
        print(f"submitted {len(job_ids)} jobs: {' '.join(job_ids)}" if job_ids else
              "nothing to submit: every run is done, queued or running")
        print(f"follow them with: python -m paper_repro status {' '.join(args.experiments)} "
              f"--scale {args.scale or 'paper'}")
        return 0
    args.scale = args.scale or default_scale()
    configs = _sweep_configs(args, args.scale)  # all validated first
    _check_select(configs, args.select)
    outcome = _train(configs, args, args.select)
    _render_sweep(args)  # what is done is rendered, even when some runs failed
    outcome.raise_if_failed()
    return 0


def _sweep_configs(args: argparse.Namespace, scale: str) -> list:
    return [cfg for name in args.experiments for cfg in _experiment_configs(args, name, scale)]


def _render_sweep(args: argparse.Namespace) -> None:
    from ..experiment import load_experiment
    from ..report.figures import write_figures

    tables = [n for n in args.experiments if load_experiment(n).kind != "figure"]
    if len(tables) < len(args.experiments):
        for path in write_figures(args.scale, results_dir=args.results_dir or "results"):
            print(f"wrote {path}")
    if tables:
        cmd_table(argparse.Namespace(**{**vars(args), "experiments": tables}))


def cmd_plan(args: argparse.Namespace) -> int:
    """What a sweep will cost on a GPU, before it runs (paper_repro/perf/plan.py)."""
    from ..perf.plan import plan_costs, render

    if args.gpus_per_job < 1:
        raise ReproError("--gpus-per-job must be >= 1")
    configs = _experiment_configs(args, args.experiment, args.scale)
    print(render(plan_costs(configs, args.gpu, mfu=args.mfu), args.gpu, args.gpus_per_job))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Each run's state (done, running, queued, failed, not submitted, unreadable) from store
    and scheduler."""
    format_status = _slurm().format_status

    from ..store.layout import require_store

    require_store(args.results_dir or "results")
    scale = args.scale or default_scale()
    for name in args.experiments:
        print(f"{name} ({scale} scale)")
        print(format_status(_status_rows(_experiment_configs(args, name, scale))))
    return 0


def _status_rows(configs: list) -> list[dict[str, Any]]:
    """The launcher's status rows; where a run's record or config cannot be read, that run is a
    row of its own ("unreadable", with a warning) and every other run is still shown."""
    status = _slurm().status

    from ..store.layout import UnreadableRunError

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
