"""Train a run on this machine, every run it needs first: the graph of pipeline.py walked in
order, one `runner.train_run` per run. A prerequisite already done is reused, not touched (its
weights are looked up by the run that needs them). The SLURM launcher submits the same graph
as jobs chained with afterok (slurm/launcher.py)."""
from __future__ import annotations

from typing import Any

from ..store import layout
from ..training import pipeline
from ..training import runner
from ..config import RunConfig
from ..errors import ReproError


def train_with_prerequisites(cfg: RunConfig, *, run_path: str | None = None,
                             resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train `cfg` and first every run it needs (public as `paper_repro.train`); returns its
    record. With `resume`, something
    of it (its folder, or a prerequisite's) must already have been started."""
    graph = pipeline.plan([cfg], run_path=run_path)
    *needed, target = graph.values()
    if resume and not any(runner.was_started(run.directory) for run in graph.values()):
        raise ReproError(f"--resume: nothing to resume in {target.directory} (the run was never "
                         "started); leave out --resume to start it")
    for run in needed:
        if not layout.is_done(run.directory):
            runner.train_run(run.cfg, run_path=run.run_path, quiet=quiet)
    return runner.train_run(target.cfg, run_path=target.run_path, quiet=quiet)
