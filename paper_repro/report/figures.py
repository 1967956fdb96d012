"""Figures from the results store only: PNG + PDF in results/figures/<scale>/.

fig1: per-epoch accuracy of PGD AT (clean test, PGD test, PGD train) with the LR drops marked.
fig4: step-LR(i, 0.5) fine-tunes of one pre-trained model, one curve per plateau length i.
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
from ..config import load_experiment  # noqa: E402


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
    long = m.melt(id_vars="epoch", value_vars=["test_clean_acc", "test_pgd_acc", "train_pgd_acc"],
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


FIG4_PANELS = (("train_pgd_acc", "PGD accuracy, train (%)"), ("test_clean_acc", "clean accuracy, test (%)"),
               ("test_pgd_acc", "PGD accuracy, test (%)"))


def fig4_plateaus(runs: pd.DataFrame) -> plt.Figure:
    """Three panels (train robustness, clean test, PGD test) per epoch, one curve per row,
    labelled with the step-LR(i, γ) the run actually used (its stored config)."""
    frames, order = [], []
    for _, run in runs.iterrows():
        args = results.read_json(Path(run["run_dir"]) / "config.json")["schedule_args"]
        label = f"step-LR({args['plateau']:g}, {args.get('gamma', 0.5):g})"
        order.append(label)
        frames.append(results.load_metrics(run["run_dir"]).assign(schedule=label))
    data = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (column, title) in zip(axes, FIG4_PANELS):
        sns.lineplot(data=data, x="epoch", y=column, hue="schedule", hue_order=order,
                     marker="o", ax=ax, legend=ax is axes[-1])
        ax.set_ylabel(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, title=None, loc="best")
    run = runs.iloc[0]
    fig.suptitle(f"AFT with step-LR(i, 0.5), {run['arch']} on {run['dataset']} "
                 f"({run['scale']} scale), one shared pre-trained model", fontsize=9)
    fig.tight_layout()
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
    run = _first_run(runs, "fig1", "pgd_at")
    if run is None:  # before fig1's own run exists, Table 1's PGD AT row shows the same curves
        run = _first_run(runs, "table1", "pgd_at")
    if run is not None:
        written += _save(fig1_overfitting(run), out_dir, "fig1")
    fig4 = load_experiment("fig4")
    picks = [r for r in (_first_run(runs, "fig4", rid) for rid in fig4.row_ids) if r is not None]
    if picks:
        written += _save(fig4_plateaus(pd.DataFrame(picks)), out_dir, "fig4")
    run = _first_run(runs, "table1", "aft")
    if run is not None:
        written += _save(fig5_schedule(run), out_dir, "fig5")
    return written
