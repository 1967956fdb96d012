"""report/figures.py, Fig 3: LDA (c-1 dims) then PCA (2-D) of penultimate features, one panel per
model, one colour per class, the class names in a legend; drawable from results/ alone."""
from __future__ import annotations

import numpy as np
import pandas as pd

from paper_repro import results
from paper_repro.orchestration import local
from paper_repro.training import runner
from paper_repro.data import dataset_info
from paper_repro.report import figures, plots
from conftest import tiny_config


def _nearest_centroid_accuracy(xy: np.ndarray, labels: np.ndarray) -> float:
    classes = np.unique(labels)
    centroids = np.stack([xy[labels == c].mean(0) for c in classes])
    pred = classes[((xy[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == labels).mean())


def _blobs(n_per_class: int = 100, classes: int = 5, dims: int = 20, seed: int = 0):
    """Classes on a circle in dims 0-1 (unit noise), and a nuisance of 10x larger variance in
    every other dimension: PCA alone sees the nuisance, LDA finds the classes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    angles = 2 * np.pi * labels / classes
    x = rng.normal(size=(len(labels), dims))
    x[:, 2:] *= 10.0
    x[:, 0] += 8 * np.cos(angles)
    x[:, 1] += 8 * np.sin(angles)
    return x, labels


def test_lda_pca_projection_separates_the_classes_in_2d():
    x, labels = _blobs()
    xy = figures.lda_pca_projection(x, labels)
    assert xy.shape == (len(labels), 2)
    assert _nearest_centroid_accuracy(xy, labels) >= 0.9
    # the LDA step is what finds them: PCA alone on the raw features does not
    from sklearn.decomposition import PCA
    assert _nearest_centroid_accuracy(PCA(2).fit_transform(x), labels) < 0.6


def test_fig3_draws_one_panel_per_model_with_the_class_names_in_a_legend(tmp_path):
    x, labels = _blobs(classes=4)
    xy = figures.lda_pca_projection(x, labels)
    points = pd.concat([pd.DataFrame({"row": row, "label": labels, "x": xy[:, 0], "y": xy[:, 1]})
                        for row in ("natural", "pgd_at", "aft")])
    names = ["cat", "dog", "ship", "truck"]
    fig = figures.fig3_features(points, names)
    assert [ax.get_title() for ax in fig.axes] == ["(a) Natural", "(b) PGD AT", "(c) AFT"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names
    paths = plots.save_figure(fig, tmp_path, "fig3")
    assert [p.name for p in paths] == ["fig3.png", "fig3.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"


def test_fig3_from_checkpoints_then_from_the_stored_points_alone(tmp_path):
    """aggregate redraws Fig 3 from results/ (the points CSV) once checkpoints are gone."""
    for method in ("natural", "pgd_at", "aft"):
        extra = {"pretrain": {"epochs": 1}} if method == "aft" else {}
        local.train_with_prerequisites(tiny_config(tmp_path, method=method, experiment="table1", epochs=1,
                                **extra), quiet=True)
    out = tmp_path / "figures" / "smoke"
    written = figures.write_figures("smoke", tmp_path)
    assert out / "fig3.png" in written and out / "fig3.pdf" in written
    points = pd.read_csv(out / "fig3_points.csv")
    assert list(points["row"].unique()) == ["natural", "pgd_at", "aft"]
    assert (points.groupby("row").size() == 2000).all()
    # the panels are different models' features of the same test images
    a, b = (points[points["row"] == r] for r in ("natural", "aft"))
    assert (a["label"].to_numpy() == b["label"].to_numpy()).all()
    assert not np.allclose(a["x"].to_numpy(), b["x"].to_numpy())
    names = dataset_info("fashion-mnist").class_names
    assert set(points["label"]) == set(range(len(names)))

    for checkpoint in (tmp_path / "runs" / "smoke" / "table1").glob("*/seed0/checkpoint.pt"):
        checkpoint.unlink()
    (out / "fig3.png").unlink()
    written = figures.write_figures("smoke", tmp_path)
    assert out / "fig3.png" in written
    pd.testing.assert_frame_equal(pd.read_csv(out / "fig3_points.csv"), points)


def test_fig3_needs_all_three_runs(tmp_path):
    runner.train_run(tiny_config(tmp_path, method="natural", experiment="table1", epochs=1),
                 quiet=True)
    assert figures.fig3_points(results.load(tmp_path)) is None
    assert not any(p.name.startswith("fig3") for p in figures.write_figures("smoke", tmp_path))
