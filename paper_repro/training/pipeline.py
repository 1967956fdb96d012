"""The graph of runs: which runs a run needs done before its first epoch (AFT's natural
pre-training; the teacher that pseudo-labels a self-training pre-training's extra images), as a
pure function of its config. One graph, three walkers: the local path (local.py) trains it in
order, the SLURM launcher submits it as jobs chained with afterok, and the runner takes what it
needs from the finished prerequisites (their weights, the teacher's labels) and never trains one.

    AFT(+500K):  teacher (natural, labelled subset)  ->  pre-training on labelled + pseudo-labelled
                 images  ->  the adversarial fine-tune
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..store import layout
from ..models.weights import load_weights
from ..config import PRETRAIN_INHERITED_FIELDS, RunConfig, build_config
from ..data import DatasetInfo
from ..runtime.environment import resolve_device
from ..errors import CheckpointError, ReproError
from .methods import get_method
from ..models import build_model
from ..models.pretrained import apply_init

# --- the graph (pure) -------------------------------------------------------------------------


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """The natural pre-training run of an AFT row: the natural recipe on the row's data and
    model, then the row's `pretrain` overrides. Stored under pretrain/<hash> and reused. It
    holds out the row's validation images too (val_n), so no run of the graph trains on them."""
    recipe = get_method("natural").recipe
    inherited = {k: getattr(cfg, k) for k in PRETRAIN_INHERITED_FIELDS}  # declared on RunConfig
    return build_config(("natural recipe", recipe), ("AFT row", inherited),
                        ("no AutoAttack on a pre-training", {"aa_n": 0}),
                        ("pretrain", cfg.pretrain or {}), experiment="pretrain", row="pretrain",
                        scale=cfg.scale, seed=cfg.seed, method="natural")


def teacher_config(cfg: RunConfig) -> RunConfig:
    """The self-training teacher of a pseudo-label pre-training: the same run without the extra
    data (so it is the plain AFT row's pre-training, reused by hash)."""
    return dataclasses.replace(cfg, extra_data=None, extra_data_n=0, extra_data_path=None)


def needs_pretraining(cfg: RunConfig) -> bool:
    return not cfg.init and cfg.pretrain is not None


def prerequisites(cfg: RunConfig) -> list[RunConfig]:
    """The runs `cfg` needs done first, directly (each may need others: see `plan`)."""
    out = []
    if needs_pretraining(cfg):
        out.append(pretrain_config(cfg))
    if cfg.extra_data == "pseudo-label":
        out.append(teacher_config(cfg))
    return out


def prerequisite_path(cfg: RunConfig) -> str:
    """Prerequisites are stored by config hash, so rows that share one train it once."""
    return layout.pretrain_path(cfg.scale, cfg.config_hash())


@dataclass(frozen=True)
class PlannedRun:
    cfg: RunConfig
    run_path: str
    directory: Path
    needs: tuple[Path, ...]  # the run folders that must be done first


def plan(configs: Sequence[RunConfig], run_path: str | None = None) -> dict[Path, PlannedRun]:
    """Every run of `configs` and every run it needs, deduplicated by folder and ordered so
    that a run comes after everything it needs (depth first). `run_path` names the first
    config's folder when it is not its own `run_path`."""
    runs: dict[Path, PlannedRun] = {}

    def visit(cfg: RunConfig, path: str) -> Path:
        directory = layout.run_dir(cfg.results_dir, path)
        if directory not in runs:
            needs = tuple(visit(c, prerequisite_path(c)) for c in prerequisites(cfg))
            runs[directory] = PlannedRun(cfg, path, directory, needs)
        return directory

    for i, cfg in enumerate(configs):
        visit(cfg, (run_path if i == 0 else None) or cfg.run_path)
    return runs


# --- what a run takes from its finished prerequisites ----------------------------------------


def finished_prerequisite(cfg: RunConfig, needed_by: str) -> Path:
    """The folder of the done prerequisite run `cfg`, with its weights; one line if not."""
    path = prerequisite_path(cfg)
    directory = layout.run_dir(cfg.results_dir, path)
    if not layout.is_done(directory):
        raise ReproError(f"{needed_by} needs run {path} done first, and it is not: train it "
                         "through `python -m paper_repro run|sweep` or `paper_repro.train`, "
                         "which train every run a run needs first")
    if not (directory / "checkpoint.pt").is_file():
        # a fresh clone: the records are committed, the weights never are
        raise CheckpointError(
            f"pre-training run {path} is done but its checkpoint.pt is not in {directory} "
            "(checkpoints are not kept in git): copy it back, or move that folder away to train "
            "the pre-training again (runs already fine-tuned from it keep their records)")
    return directory


def check_prerequisites(cfg: RunConfig, run_path: str) -> None:
    """Fail with one line, before anything is written, if a run `cfg` needs is not done."""
    for needed in prerequisites(cfg):
        finished_prerequisite(needed, run_path)


def resolve_init(model: nn.Module, cfg: RunConfig, run_path: str) -> tuple[str, str]:
    """Start from pre-trained weights: `init` (any form of pretrained.py) or the finished
    pre-training run. Returns (source, note); the note says what was adapted, e.g. a head."""
    if cfg.init:
        loaded = apply_init(model, cfg.init, results_dir=cfg.results_dir, arch=cfg.arch)
        return loaded.source, loaded.note
    if cfg.pretrain is not None:
        directory = finished_prerequisite(pretrain_config(cfg), run_path)
        load_weights(model, directory / "checkpoint.pt")
        return str(directory), ""
    return "", ""


def pseudo_labeller(cfg: RunConfig, info: DatasetInfo, run_path: str):
    """Self-training (the cpu stand-in of Carmon et al.'s +500K): the finished teacher, trained
    on the labelled subset, labels held-out images with its predictions."""
    teacher_cfg = teacher_config(cfg)
    teacher_dir = finished_prerequisite(teacher_cfg, run_path)

    def label(images: torch.Tensor) -> torch.Tensor:
        device = resolve_device(cfg.device)
        teacher = build_model(teacher_cfg, info).to(device)
        load_weights(teacher, teacher_dir / "checkpoint.pt")
        teacher.eval()
        labels = []
        with torch.no_grad():
            for start in range(0, len(images), 1000):
                x = images[start:start + 1000].to(device).float().div_(255)
                labels.append(teacher(x).argmax(1).cpu())
        return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)

    return label
