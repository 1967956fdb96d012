"""Figures from the results store only: PNG + PDF in results/figures/<scale>/.

fig1: per-epoch accuracy of PGD AT (clean test, PGD test, PGD train, PGD validation) with the LR
      drops marked.
fig3: penultimate-layer features of a fixed set of test images, LDA to c-1 dims then PCA to 2-D,
      one panel per model (natural, PGD AT, AFT: Table 1's runs), one colour per class.
fig4: step-LR(i, 0.5) fine-tunes of one pre-trained model, one curve per plateau length i.
fig5: the 'slow start, fast decay' schedule an AFT run actually used, per iteration.
pareto_<table>: robustness against training cost for every row of a table: PGD-20 and AutoAttack
      accuracy against counted training FLOPs (AFT with and without its pre-training as two
      linked points), error bars over seeds, and the paper's own points against its reported
      times. Drawn from the table's cells (`tables.table_frame`), i.e. from the store alone.
regime: the regime search's curves, one panel per setting, with its table (report/regime.py).

Every file is byte-stable: the same store gives the same bytes (no dates or versions in the
PNG and PDF metadata), so `aggregate` leaves a clean git tree when nothing changed.

Fig 3 needs the runs' checkpoints, which are not in git. When they are present, `write_figures`
computes the 2-D points and stores them in results/figures/<scale>/fig3_points.csv (small, in
git); without them it draws from that CSV, so `aggregate` rebuilds Fig 3 from results/ alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import seaborn as sns  # noqa: E402

from ..store import files, layout, query  # noqa: E402
from ..experiment import load_experiment  # noqa: E402
from .plots import save_figure  # noqa: E402
from ..training.methods import get_method  # noqa: E402


def _first_run(runs: pd.DataFrame, experiment: str, row: str) -> pd.Series | None:
    if runs.empty:
        return None
    pick = runs[(runs["experiment"] == experiment) & (runs["row"] == row)
                & (runs["status"] == layout.STATUS_DONE)].sort_values("seed")
    return None if pick.empty else pick.iloc[0]


def fig1_overfitting(run: pd.Series) -> plt.Figure:
    """Accuracy per epoch on clean test, PGD test and PGD train data; LR drops as lines."""
    m = query.load_metrics(run["run_dir"])
    names = {"test_clean_acc": "clean test", "test_pgd_acc": "PGD test",
             "train_pgd_acc": "PGD train", "val_pgd_acc": "PGD validation"}
    curves = [c for c in names if c in m]  # no PGD curves when monitor_n = 0, no validation
    long = m.melt(id_vars="epoch", value_vars=curves,  # curve without a validation split
                  var_name="curve", value_name="accuracy (%)")
    long["curve"] = long["curve"].map(names)
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=long, x="epoch", y="accuracy (%)", hue="curve",
                 marker="o" if len(m) <= 60 else None, ax=ax)
    ax.legend(title=None, fontsize=8, loc="lower right")  # below the curves, clear of them
    drops = m["epoch"][m["lr"].diff() < 0]
    for e in drops:
        ax.axvline(e - 0.5, color="grey", ls="--", lw=0.8)
    net = run.get("arch_label") or run["arch"]
    ax.set_title(f"PGD AT, {net} on {run['dataset']} ({run['scale']} scale); "
                 "dashed: LR drops", fontsize=9)
    return fig


FIG4_PANELS = (("train_pgd_acc", "PGD accuracy, train (%)"),
               ("test_clean_acc", "clean accuracy, test (%)"),
               ("test_pgd_acc", "PGD accuracy, test (%)"))


def fig4_plateaus(runs: pd.DataFrame) -> plt.Figure:
    """Three panels (train robustness, clean test, PGD test) per epoch, one curve per row,
    labelled with the step-LR(i, γ) the run actually used (its stored config)."""
    frames, order = [], []
    for _, run in runs.iterrows():
        args = layout.read_json(Path(run["run_dir"]) / "config.json")["schedule_args"]
        label = f"step-LR({args['plateau']:g}, {args.get('gamma', 0.5):g})"
        order.append(label)
        frames.append(query.load_metrics(run["run_dir"]).assign(schedule=label))
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
    net = run.get("arch_label") or run["arch"]
    fig.suptitle(f"AFT with step-LR(i, 0.5), {net} on {run['dataset']} "
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


# --- Fig 3: feature spaces ------------------------------------------------------------------

FIG3_ROWS = {"natural": "(a) Natural", "pgd_at": "(b) PGD AT", "aft": "(c) AFT"}  # Table 1 rows
FIG3_N = 2000  # fixed test images (evaluation.fixed_subset: the same for every panel)


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, images: torch.Tensor, *, batch: int = 500,
                         device: torch.device | str = "cpu") -> np.ndarray:
    """`model.features` (the classifier head's input) of uint8 or [0,1] images, eval mode."""
    model.eval().to(device)
    out = []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        out.append(model.features(x).float().cpu())
    return torch.cat(out).numpy()


def lda_pca_projection(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[n, D] features -> [n, 2]: LDA to c-1 dimensions (class-discriminative directions),
    then PCA to the two of largest variance, as the paper's Fig 3."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    labels = np.asarray(labels)
    n_lda = min(len(np.unique(labels)) - 1, features.shape[1])
    if n_lda < 2:
        raise ValueError("LDA + PCA to 2-D needs at least 3 classes and 2 feature dimensions")
    lda = LinearDiscriminantAnalysis(n_components=n_lda).fit_transform(features, labels)
    return PCA(n_components=2).fit_transform(lda)


def fig3_points(runs: pd.DataFrame, n: int = FIG3_N) -> pd.DataFrame | None:
    """The 2-D points of every Fig 3 panel from the runs' checkpoints; None if one is missing."""
    from ..models.weights import load_weights
    from ..config import build_config
    from ..data import dataset_info, load_arrays
    from ..robustness.evaluation import fixed_subset
    from ..models import build_model

    picked = {row: _first_run(runs, "table1", row) for row in FIG3_ROWS}
    if any(r is None or not (Path(r["run_dir"]) / "checkpoint.pt").is_file()
           for r in picked.values()):
        return None
    frames, test_sets = [], {}
    for row, run in picked.items():
        stored = layout.read_json(Path(run["run_dir"]) / "config.json")
        cfg = build_config(("stored", {k: v for k, v in stored.items() if k != "config_hash"}))
        info = dataset_info(cfg.dataset)
        key = (cfg.dataset, cfg.data_root)
        if key not in test_sets:  # read once for all panels
            test_sets[key] = load_arrays(cfg.dataset, cfg.data_root, train=False)
        images, labels = test_sets[key]
        idx = fixed_subset(len(labels), n)
        model = build_model(cfg, info)
        load_weights(model, Path(run["run_dir"]) / "checkpoint.pt")
        xy = lda_pca_projection(penultimate_features(model, images[idx]), labels[idx].numpy())
        frames.append(pd.DataFrame({"row": row, "label": labels[idx].numpy(),
                                    "x": xy[:, 0].round(4), "y": xy[:, 1].round(4)}))
    return pd.concat(frames, ignore_index=True)


def fig3_features(points: pd.DataFrame, class_names: Sequence[str],
                  titles: dict[str, str] = FIG3_ROWS, subtitle: str = "") -> plt.Figure:
    """One scatter panel per model (column `row`), one colour per class, class names in a legend."""
    from matplotlib.lines import Line2D

    rows = [r for r in titles if r in set(points["row"])]
    palette = np.array(sns.color_palette("tab10" if len(class_names) <= 10 else "husl",
                                         len(class_names)))
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.2), squeeze=False)
    for ax, row in zip(axes[0], rows):
        panel = points[points["row"] == row]
        # drawn in a fixed shuffled order, so that no class hides under the one drawn after it
        panel = panel.iloc[np.random.default_rng(0).permutation(len(panel))]
        ax.scatter(panel["x"], panel["y"], s=4, alpha=0.6, c=palette[panel["label"].to_numpy()],
                   rasterized=True)
        ax.set_title(titles[row], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], ls="", marker="o", color=palette[i], label=name)
               for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
               fontsize=8)
    fig.suptitle(f"Penultimate features, LDA (c-1 dims) then PCA (2-D){subtitle}", fontsize=10)
    fig.tight_layout()
    return fig


def write_fig3(runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Fig 3 from the checkpoints (refreshing fig3_points.csv), else from the CSV, else nothing."""
    from ..data import dataset_info
    from ..errors import DataError

    csv = out_dir / "fig3_points.csv"
    try:
        points = fig3_points(runs)
    except DataError:  # checkpoints without the test images: the stored points still draw
        points = None
    if points is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(csv, points.to_csv(index=False))
        points = pd.read_csv(csv)  # drawn from the CSV either way: the same bytes without them
    elif csv.is_file():
        points = pd.read_csv(csv)
    # any of the panels' runs names the network and data (one unreadable record hides nothing)
    run = next((r for r in (_first_run(runs, "table1", row) for row in FIG3_ROWS)
                if r is not None), None)
    if points is None or run is None:
        return []
    info = dataset_info(run["dataset"])
    net = run.get("arch_label") or run["arch"]
    subtitle = f"; {net} on {info.name}, {points['row'].value_counts().iloc[0]} test images"
    return save_figure(fig3_features(points, info.class_names, subtitle=subtitle), out_dir, "fig3")


# --- cost against robustness --------------------------------------------------------------

def _finite(value: object) -> bool:
    try:
        return bool(np.isfinite(float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def pareto_figure(name: str, cells: pd.DataFrame, scale: str) -> plt.Figure | None:
    """PGD-20 and AutoAttack accuracy against training cost (PFLOP, log) for the rows of a
    table (`cells` = tables.table_frame), one marker per method and one colour per row, error
    bars over seeds; AFT's fine-tuning alone (open marker) linked to fine-tuning plus its
    pre-training (filled). A third panel: the paper's PGD-20 against its reported times.
    None when no row has a finished run."""
    from matplotlib.lines import Line2D

    exp = load_experiment(name)
    done = cells["status"].astype(str).str.startswith("done") & cells["cost_pflop"].map(_finite)
    if not done.any():
        return None
    labels = list(cells["method"])
    shown = [f"{lab} ({arch})" if labels.count(lab) > 1 else lab
             for lab, arch in zip(labels, cells["paper_arch"])]
    colours = sns.color_palette("tab10" if len(cells) <= 10 else "tab20", len(cells))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    handles, linked, missing, untimed = [], False, [], []
    for i, (_, cell) in enumerate(cells.iterrows()):
        marker = get_method(exp.row(cell["row"])["method"]).marker  # declared by the method
        colour = colours[i]
        handles.append(Line2D([], [], ls="", marker=marker, color=colour, label=shown[i]))
        if not done.iloc[i]:
            missing.append(f"{shown[i]} ({cell['status']})")
        else:
            cost = float(cell["cost_pflop"])
            pre = float(cell["pretrain_pflop"]) if _finite(cell["pretrain_pflop"]) else 0.0
            for ax, acc, std in ((axes[0], "pgd_acc", "pgd_std"), (axes[1], "aa_acc", "aa_std")):
                if not _finite(cell[acc]):
                    continue
                y = float(cell[acc])
                ax.errorbar(cost + pre, y, yerr=float(cell[std]) if _finite(cell[std]) else None,
                            ls="", marker=marker, ms=9, color=colour, capsize=3)
                if pre > 0:  # the same model without its pre-training's cost
                    ax.plot([cost, cost + pre], [y, y], ls=":", lw=1, color=colour)
                    ax.plot(cost, y, ls="", marker=marker, ms=9, mfc="none", mec=colour)
                    linked = True
        if _finite(cell["paper_time"]) and _finite(cell["paper_pgd"]):
            axes[2].plot(float(cell["paper_time"]), float(cell["paper_pgd"]), ls="",
                         marker=marker, ms=9, color=colour)
        else:
            untimed.append(shown[i])
    aa_n = "/".join(sorted({str(v) for v in cells["aa_n"].dropna() if str(v)}))
    unit = "hours" if exp.time_unit in ("h", "hours") else "min"
    titles = (f"ours ({scale} scale): PGD-20", "ours: AutoAttack" +
              (f" ({aa_n} images)" if aa_n else ""), "the paper: PGD-20, its reported times")
    xlabels = ("training cost (PFLOP, log scale)",) * 2 + (f"reported training time ({unit}, "
                                                          "log scale)",)
    ylabels = ("PGD-20 accuracy (%)", "AutoAttack accuracy (%)", "PGD-20 accuracy (%)")
    for ax, title, xlabel, ylabel in zip(axes, titles, xlabels, ylabels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.lines or ax.collections:
            ax.set_xscale("log")  # 1, 2, 5 x 10^k ticks as plain numbers (0.0002, 0.0005)
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="grey")
        ax.grid(alpha=0.3, which="both")
    if linked:
        handles.append(Line2D([], [], ls=":", marker="o", mfc="none", color="grey",
                              label="open: AFT without its pre-training"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
               fontsize=8)
    stand_in = "" if scale == "paper" else "; ours are cpu-scale stand-ins" \
        if scale == "cpu" else f"; ours are {scale}-scale stand-ins"
    fig.suptitle(f"{exp.title}: robustness against training cost{stand_in}", fontsize=10)
    notes = ([f"not shown (ours): {', '.join(missing)}"] if missing else []) + \
        ([f"not shown (paper, no reported time): {', '.join(untimed)}"] if untimed else [])
    if notes:
        fig.text(0.01, -0.02, ".  ".join(notes), fontsize=8, color="grey")
    fig.tight_layout()
    return fig


def write_pareto(scale: str, results_dir: str | Path, out_dir: Path) -> list[Path]:
    """pareto_<table>.{png,pdf} for every table of the paper with runs at this scale (not the
    suite's own sweeps, which have no paper points to show beside ours)."""
    from .tables import table_frame, tables_with_results

    written: list[Path] = []
    for name in tables_with_results(scale, results_dir):
        if not load_experiment(name).paper_csv:
            continue
        fig = pareto_figure(name, table_frame(name, scale, results_dir), scale)
        if fig is not None:
            written += save_figure(fig, out_dir, f"pareto_{name}")
    return written


def write_figures(scale: str, results_dir: str | Path = "results") -> list[Path]:
    """Every figure whose runs exist at this scale."""
    runs = query.load(results_dir, scale=scale)
    out_dir = Path(results_dir) / "figures" / scale
    written: list[Path] = []
    run = _first_run(runs, "fig1", "pgd_at")
    if run is None:  # before fig1's own run exists, Table 1's PGD AT row shows the same curves
        run = _first_run(runs, "table1", "pgd_at")
    if run is not None:
        written += save_figure(fig1_overfitting(run), out_dir, "fig1")
    fig4 = load_experiment("fig4")
    picks = [r for r in (_first_run(runs, "fig4", rid) for rid in fig4.row_ids) if r is not None]
    if picks:
        written += save_figure(fig4_plateaus(pd.DataFrame(picks)), out_dir, "fig4")
    run = _first_run(runs, "table1", "aft")
    if run is not None:
        written += save_figure(fig5_schedule(run), out_dir, "fig5")
    written += write_fig3(runs, out_dir)
    written += write_pareto(scale, results_dir, out_dir)
    from .regime import write_regime  # its table too: the search is rendered in one place

    written += write_regime(scale, results_dir)
    return written
