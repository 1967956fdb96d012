"""The command line's parser: one table of flags per concern (like fast_adversarial's
get_args) and a subcommand per verb; the handlers live in train.py and report.py.

The SLURM flags are declared here, with the plug-in's module name, so that building the parser
never imports the plug-in (slurm/launcher.py reads the flags back: `options_from_args`).
"""
from __future__ import annotations

import argparse
from typing import Any

from ..perf import gpus

FRESH_DIR = "results-fresh"  # where `./reproduce.sh TABLE --fresh` re-runs (git-ignored)


SLURM_LAUNCHER = "slurm.launcher"  # the SLURM plug-in, imported by name when a command needs it


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
OVERRIDE_FLAGS: list[tuple[str, str, Any, str]] = [
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
    for flag, _key, typ, help_ in OVERRIDE_FLAGS:
        g.add_argument(flag, type=typ, default=None, help=help_)
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-reproducible mode (resume gives identical results)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set schedule_args.peak_at=0.2 (repeatable)")


def default_scale() -> str:
    import torch

    if torch.cuda.is_available():
        return "paper"
    print("no GPU found: using the cpu scale (Fashion-MNIST stand-ins); --scale paper to "
          "force the paper's setup")
    return "cpu"


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

    p = runlike("finetune", "adversarially fine-tune a pre-trained model (AFT)")
    p.add_argument("--name", default="finetune", help="row name in the store")

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
    p.set_defaults(scale="paper")

    p = runlike("status", "each run's state: done, running, queued, failed (with its log) or "
                          "not submitted")
    p.add_argument("experiments", nargs="+", help="e.g. table1")
    p.add_argument("--rows", help="comma-separated subset of rows")
    p.add_argument("--controlled", metavar="ARCH", help="the controlled variant on ARCH")

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

    p = sub.add_parser("aggregate", help="rebuild every table and figure from results/ alone")
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default=None)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero when a run's record or config cannot be read (default: "
                        "warn, show its cell as unreadable and render the rest)")

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

    p = sub.add_parser("export", help="write a run's model as model.safetensors, "
                                      "model_info.json and a README.md model card")
    p.add_argument("run", help="run path in the store, e.g. cpu/table1/aft/seed0")
    p.add_argument("--out", required=True, help="folder to create (absent or empty)")
    p.add_argument("--select", choices=["final", "best"], default="final",
                   help="final: checkpoint.pt; best: the run's best.pt, where it kept one")
    p.add_argument("--results-dir", default=None, help="results store (default results)")


def _add_device_commands(sub: Any) -> None:
    """The commands that measure the machine (synthetic data, nothing stored in runs/)."""
    from ..perf import bench
    p = sub.add_parser("bench", help="images/s, FLOPs and MFU of one method's training step")
    bench.add_arguments(p)

    from ..perf import gpucheck
    p = sub.add_parser("gpucheck", help="the one GPU check (<= 8 min): bench of every Table 1 "
                       "pair eager and compiled, a PGD-10 epoch, bf16 vs fp32, Table 1's hours")
    gpucheck.add_arguments(p)
