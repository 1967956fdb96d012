"""Figures from the results store only: PNG + PDF in results/figures/<scale>/.

fig1: per-epoch accuracy of PGD AT (clean test, PGD test, PGD train) with the LR drops marked.
fig5: the 'slow start, fast decay' schedule an AFT run actually used, per iteration.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .. import results  # noqa: E402


def _save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    plt.close(fig)
    return paths


def _first_run(runs: pd.DataFrame, experiment: str, row: str) -> pd.Series | None:
    if runs.empty:
        return None
    pick = runs[(runs["experiment"] == experiment) & (runs["row"] == row)
                & (runs["status"] == results.STATUS_DONE)].sort_values("seed")
    return None if pick.empty else pick.iloc[0]


def fig1_overfitting(run: pd.Series) -> plt.Figure:
    """Accuracy per epoch on clean test, PGD test and PGD train data; LR drops as lines."""
    m = results.load_metrics(run["run_dir"])
    curves = [c for c in ("test_clean_acc", "test_pgd_acc", "train_pgd_acc") if c in m]
    long = m.melt(id_vars="epoch", value_vars=curves,  # no PGD curves when monitor_n = 0
                  var_name="curve", value_name="accuracy (%)")
    long["curve"] = long["curve"].map({"test_clean_acc": "clean test", "test_pgd_acc":
                                       "PGD test", "train_pgd_acc": "PGD train"})
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=long, x="epoch", y="accuracy (%)", hue="curve", marker="o", ax=ax)
    drops = m["epoch"][m["lr"].diff() < 0]
    for e in drops:
        ax.axvline(e - 0.5, color="grey", ls="--", lw=0.8)
    ax.set_title(f"PGD AT, {run['arch']} on {run['dataset']} ({run['scale']} scale); "
                 "dashed: LR drops", fontsize=9)
    return fig


def fig5_schedule(run: pd.Series) -> plt.Figure:
    """The LR of every optimiser step of an AFT run, with epoch ticks."""
    lr = pd.read_csv(Path(run["run_dir"]) / "lr.csv")
    steps_per_epoch = int(run["steps_per_epoch"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lr["step"], lr["lr"], lw=1.5)
    epochs = int(run["epochs_done"])
    ax.set_xticks([e * steps_per_epoch for e in range(epochs + 1)])
    ax.set_xticklabels([str(e) for e in range(epochs + 1)])
    ax.set_xlabel("epoch (ticks); one point per iteration")
    ax.set_ylabel("learning rate (Adam)")
    ax.set_title(f"'Slow start, fast decay' as used by {run['run_path']}", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def write_figures(scale: str, results_dir: str | Path = "results") -> list[Path]:
    """Every figure whose runs exist at this scale."""
    runs = results.load(results_dir, scale=scale)
    out_dir = Path(results_dir) / "figures" / scale
    written: list[Path] = []
    run = _first_run(runs, "table1", "pgd_at")
    if run is not None:
        written += _save(fig1_overfitting(run), out_dir, "fig1")
    run = _first_run(runs, "table1", "aft")
    if run is not None:
        written += _save(fig5_schedule(run), out_dir, "fig5")
    return written
